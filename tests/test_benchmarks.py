"""The benchmark command end to end on small shapes, and CPU timings under pytest-benchmark."""

import json

import torch

from benchmarks import model, run
from trm.config import ModelConfig
from trm.losses import act_loss
from trm.model import TRM


def test_benchmark_command_writes_json_markdown_and_plot(tmp_path, monkeypatch):
    quick = model.configs(quick=True)[:1]
    quick[0] = (*quick[0][:3], [1])
    monkeypatch.setattr(model, "configs", lambda quick_: quick)
    run.main(["--out", str(tmp_path), "--quick", "--no-compile"])
    data = json.loads((tmp_path / "results.json").read_text())
    groups = {r["group"] for r in data["rows"]}
    assert {"add+rmsnorm forward", "swiglu backward", "attention forward", "training step"} <= groups
    assert data["ceilings"]["copy_gbps"] > 0 and data["environment"]["torch"] == torch.__version__
    providers = {r["provider"] for r in data["rows"] if r["group"] == "add+rmsnorm forward"}
    assert {"eager", "triton"} <= providers  # the interpreter runs the fused kernels on CPU
    assert "| case | provider | ms |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.png").stat().st_size > 0


def test_flop_count_of_a_training_step():
    cfg = ModelConfig(vocab_size=11, seq_len=81, hidden_size=512, mlp_t=False, puzzle_emb_len=16, T=3, n=6)
    tokens = 97
    per_call = 2 * (2 * tokens * 512 * (3 * 512 + 512 + 3 * 1536) + 4 * tokens * tokens * 512)
    head = 2 * 81 * 512 * 11
    assert model.step_flops(cfg, 1, train=False) == per_call * 21 + head
    assert model.step_flops(cfg, 1, train=True) == per_call * 21 + head + 2 * (per_call * 7 + head)


def _tiny():
    cfg = ModelConfig(vocab_size=6, seq_len=16, hidden_size=64, num_heads=2, mlp_t=True, puzzle_emb_len=1,
                      T=2, n=2, n_sup=4)  # fmt: skip
    torch.manual_seed(0)
    batch = {"inputs": torch.randint(1, 6, (32, 16)), "labels": torch.randint(1, 6, (32, 16)),
             "puzzle_identifiers": torch.zeros(32, dtype=torch.long)}  # fmt: skip
    return TRM(cfg), batch


def test_cpu_training_step_time(benchmark):
    net, batch = _tiny()
    carry = net.initial_carry(batch)

    def step():
        new, out = net(carry, batch)
        loss, _ = act_loss(out, new)
        loss.backward()

    benchmark(step)


def test_cpu_full_solve_time(benchmark):
    net, batch = _tiny()
    net.eval()
    benchmark(lambda: list(net.solve(batch)))
