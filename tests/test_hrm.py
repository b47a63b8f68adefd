"""HRM, the baseline: parameter count, update schedule, 1-step gradient, Q-learning, fused ops."""

import pytest
import torch
import trm_kernels as K

from trm.arch import build_model
from trm.config import ModelConfig, apply_overrides, preset
from trm.hrm import HRM
from trm.losses import act_loss


def test_hrm_sudoku_parameter_count_matches_the_reference():
    model = build_model(preset("hrm-sudoku").model)
    assert isinstance(model, HRM)
    assert model.num_parameters() == 27_275_266


def small(**kw) -> ModelConfig:
    base = dict(arch="hrm", vocab_size=7, seq_len=12, hidden_size=64, num_heads=2, num_layers=1,
                puzzle_emb_len=1, T=2, n=3, n_sup=3)  # fmt: skip
    return ModelConfig(**{**base, **kw})


def batch(size=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "inputs": torch.randint(1, 7, (size, 12), generator=g),
        "labels": torch.randint(1, 7, (size, 12), generator=g),
        "puzzle_identifiers": torch.zeros(size, dtype=torch.long),
    }


def test_update_schedule_and_one_step_gradient():
    model = HRM(small())
    calls = []
    model.L_level.register_forward_hook(lambda m, i, o: calls.append(("L", torch.is_grad_enabled())))
    model.H_level.register_forward_hook(lambda m, i, o: calls.append(("H", torch.is_grad_enabled())))
    data = batch()
    x = model.embed(data["inputs"], data["puzzle_identifiers"])
    y0, z0 = (t.clone().requires_grad_() for t in model.initial_y_z(3))
    model.deep_recursion(x, y0, z0)
    # H_cycles = 2, L_cycles = 3: L L L H L L | L H, only the last L and H with grad
    assert [c[0] for c in calls] == ["L", "L", "L", "H", "L", "L", "L", "H"]
    assert [c[1] for c in calls] == [False] * 6 + [True, True]


def test_q_learning_target_is_the_next_steps_value():
    model = HRM(small()).train()
    data = batch()
    carry = model.initial_carry(data)
    torch.manual_seed(0)
    carry, out = model(carry, data)
    assert {"q_continue", "target_q_continue"} <= set(out)
    x = model.embed(data["inputs"], data["puzzle_identifiers"]).detach()
    next_q = model._eval_step(x, carry.y, carry.z)[3]
    want = torch.sigmoid(next_q.max(dim=-1).values)  # no slot is at its last step yet
    torch.testing.assert_close(out["target_q_continue"], want)
    loss, _ = act_loss(out, carry)
    loss.backward()
    assert model.q_head.weight.grad.abs().sum() > 0


def test_hrm_halts_when_q_halt_beats_q_continue():
    model = HRM(small(halt_exploration_prob=0.0)).train()
    with torch.no_grad():
        model.q_head.bias.copy_(torch.tensor([1.0, 2.0]))  # continue wins: no early halt
    data = batch()
    carry, _ = model(model.initial_carry(data), data)
    assert not carry.halted.any()
    with torch.no_grad():
        model.q_head.bias.copy_(torch.tensor([2.0, 1.0]))
    carry, _ = model(model.initial_carry(data), data)
    assert carry.halted.all()


@pytest.mark.skipif("triton" not in K.available("rope_attention"), reason="triton is not installed")
def test_hrm_with_fused_ops_equals_hrm_with_reference_ops():
    torch.manual_seed(0)
    model = HRM(small(forward_dtype="float32")).train()
    data = batch()
    results = {}
    for backend in ("reference", "triton"):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        with K.use_backend(backend):
            carry, out = model(model.initial_carry(data), data)
            loss, _ = act_loss(out, carry)
            loss.backward()
        results[backend] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (loss_r, grads_r), (loss_f, grads_f) = results["reference"], results["triton"]
    assert loss_f == pytest.approx(loss_r, rel=1e-4)
    for name, want in grads_r.items():
        err = (grads_f[name] - want).norm() / want.norm().clamp_min(1e-12)
        assert err < 1e-3, f"{name}: relative gradient error {err:.2e}"


def test_hrm_trains_through_the_same_loop(sudoku4_data, tmp_path):
    from trm.train import Trainer

    cfg = apply_overrides(preset("sudoku4"), ["model.arch=hrm", "model.hidden_size=32", "model.num_layers=1",
                                              "model.T=2", "model.n=2", "train.global_batch_size=32"])  # fmt: skip
    trainer = Trainer(cfg, sudoku4_data, tmp_path, torch.device("cpu"))
    losses = [trainer.train_step()["lm_loss"].item() for _ in range(5)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert trainer.evaluate()["count"] == 64


def test_switching_a_trm_preset_to_hrm_takes_hrms_structure_and_says_so():
    notes = []
    cfg = apply_overrides(preset("sudoku-mlp"), ["model.arch=hrm", "model.T=3"], notes)
    m = cfg.model
    assert (m.num_layers, m.puzzle_emb_len, m.T, m.n, m.mlp_t) == (4, 1, 3, 2, False)  # T as set explicitly
    assert notes == ["model.arch=hrm takes HRM's structure: num_layers 2 -> 4, puzzle_emb_len 16 -> 1, n 6 -> 2, "
                     "mlp_t True -> False (set any of them with --set to choose otherwise)"]  # fmt: skip
    same = apply_overrides(preset("sudoku-att"), ["model.arch=hrm"])
    assert same.model == preset("hrm-sudoku").model  # the faithful preset, from either starting point
    notes = []
    apply_overrides(preset("hrm-sudoku"), ["model.hidden_size=256"], notes)
    assert notes == []  # no switch, no note
