"""Training: exact resume, DDP equivalence, and that a tiny TRM really learns 4x4 Sudoku."""

import gc
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trm.config import apply_overrides, preset
from trm.train import Trainer


def tiny(**extra):
    overrides = [
        "model.hidden_size=32",
        "model.n_sup=3",
        "train.global_batch_size=32",
        "train.eval_batch_size=64",
        "train.lr_warmup_steps=2",
        "train.ema_rate=0.9",
    ]
    return apply_overrides(preset("sudoku4"), overrides + [f"{k}={v}" for k, v in extra.items()])


def losses(trainer: Trainer, steps: int) -> list[float]:
    return [trainer.train_step()["lm_loss"].item() for _ in range(steps)]


@pytest.mark.parametrize("mlp_t", ["true", "false"])
def test_resumed_run_continues_exactly(sudoku4_data, tmp_path, mlp_t):
    # exploration on every slot makes the halting random, so the RNG state must be restored too
    cfg = lambda: tiny(**{"model.mlp_t": mlp_t, "model.halt_exploration_prob": 0.5})  # noqa: E731
    cpu = torch.device("cpu")
    straight = Trainer(cfg(), sudoku4_data, tmp_path / "a", cpu)
    want = losses(straight, 8)

    first = Trainer(cfg(), sudoku4_data, tmp_path / "b", cpu)
    got = losses(first, 4)
    path = first.save()
    del first
    torch.manual_seed(999)  # a resumed process starts from an unrelated RNG state
    second = Trainer(cfg(), sudoku4_data, tmp_path / "b", cpu)
    second.load(path)
    got += losses(second, 4)
    assert got == want
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), second.model.state_dict().items(), strict=False):
        assert torch.equal(a, b), name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The step's regular-parameter gradients and the puzzle-embedding rows' summed gradient."""
    out = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()}
    emb = trainer.model.puzzle_emb.local_weights.grad
    if trainer.world_size > 1:
        parts = [torch.empty_like(emb) for _ in range(trainer.world_size)]
        dist.all_gather(parts, emb.contiguous())
        emb = torch.cat(parts)
    # Sudoku: every slot uses puzzle id 0. Each process's loss is scaled by world_size (so
    # that DDP's average is the global gradient); gathered rows are summed, so divide it out
    out["puzzle_emb"] = emb.sum(0) / trainer.world_size
    return out


def _ddp_worker(rank, world, port, data, out, steps):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        trainer = Trainer(tiny(), data, out, torch.device("cpu"), rank, world)
        trainer.forward_backward()
        grads = _grads(trainer)
        if rank == 0:
            torch.save(grads, out / "grads.pt")
        trainer.optimizer_step()
        for _ in range(steps - 1):
            trainer.train_step()
        trainer.save()
        dist.barrier()  # rank 0 writes the checkpoint after the gather; tear down together
        del trainer  # DDP's reducer must go before its process group, not at interpreter exit
        gc.collect()
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_take_the_same_steps_as_one(sudoku4_data, tmp_path):
    steps = 3
    single = Trainer(tiny(), sudoku4_data, tmp_path / "one", torch.device("cpu"))
    single.forward_backward()
    want_grads = _grads(single)
    single.optimizer_step()
    for _ in range(steps - 1):
        single.train_step()
    (tmp_path / "two").mkdir()
    mp.start_processes(_ddp_worker, args=(2, _free_port(), sudoku4_data, tmp_path / "two", steps),
                       nprocs=2, start_method="spawn")  # fmt: skip
    from trm import checkpoint

    # the first step's gradients: the all-reduced (and all-gathered) ones equal one process's
    grads = torch.load(tmp_path / "two" / "grads.pt")
    for name, want in want_grads.items():
        torch.testing.assert_close(grads[name], want, rtol=1e-4, atol=1e-7, msg=name)
    tensors, meta = checkpoint.load(tmp_path / "two" / "checkpoint.safetensors")
    assert meta["world_size"] == 2 and meta["step"] == steps
    # Parameters after 3 steps. AdamATan2's first update is lr * atan2(g, |g|) = +-lr*pi/4 and
    # sign-SGD's is +-lr, so an element whose gradient is ~0 can flip with the summation order
    # of 1 vs 2 processes. All other elements must agree.
    for name, want in single.model.state_dict().items():
        got = tensors[f"model.{name}"]
        close = torch.isclose(got, want, rtol=1e-5, atol=1e-6)
        assert close.float().mean() > 0.999, f"{name}: {(~close).sum()} of {close.numel()} elements differ"
    # the carry of both processes was gathered: it equals the single process's
    torch.testing.assert_close(tensors["carry.y"], single.carry.y, rtol=1e-3, atol=1e-3)
    assert torch.equal(tensors["carry.data.inputs"], single.carry.data["inputs"])


def test_a_window_in_which_no_example_halted_has_no_accuracy_not_zero(tmp_path):
    """The first log after a resume can cover a step where nothing halted: before, it read
    'acc 0.000 steps 0.0', a false dip in metrics.png."""
    import json

    from trm.plot import plot_metrics
    from trm.train import _stats, reduce_metrics

    zero = torch.tensor(0.0)
    none_halted = reduce_metrics({"count": zero, "accuracy": zero, "exact_accuracy": zero, "q_halt_accuracy": zero,
                                  "steps": zero, "lm_loss": torch.tensor(3.0), "halt_loss": zero})  # fmt: skip
    assert none_halted["accuracy"] is None and none_halted["steps"] is None and none_halted["halted"] == 0
    assert _stats(none_halted) == "loss 3.000  (none halted)"
    records = [{"split": "train", "step": s, **none_halted} for s in (10, 20)]
    records[1] |= {"accuracy": 0.5, "exact_accuracy": 0.25, "steps": 2.0}
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert plot_metrics(tmp_path / "m.jsonl", tmp_path / "m.png").stat().st_size > 0


def test_model_compile_trains_through_torch_compile_with_the_eager_losses(sudoku4_data, tmp_path):
    """model.compile: the training forward through torch.compile (Inductor on this CPU), the
    fused ops opaque inside it; the same losses as eager, and it is compiled, not skipped."""
    cpu = torch.device("cpu")
    eager = Trainer(tiny(), sudoku4_data, tmp_path / "a", cpu)
    compiled = Trainer(tiny(**{"model.compile": "true"}), sudoku4_data, tmp_path / "b", cpu)
    assert compiled.forward is not compiled.module and eager.forward is eager.module
    torch.testing.assert_close(torch.tensor(losses(compiled, 3)), torch.tensor(losses(eager, 3)), rtol=1e-4, atol=1e-5)
