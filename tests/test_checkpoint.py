"""Checkpoint files: round trip, atomic replace, corrupt files, reference-checkpoint import."""

import os
import stat

import pytest
import torch

from trm import checkpoint
from trm.config import ModelConfig
from trm.model import TRM


def test_round_trip(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.tensor([True, False]), "c": torch.arange(5, dtype=torch.int32)}
    checkpoint.save(tmp_path / "c.safetensors", tensors, {"step": 7})
    loaded, meta = checkpoint.load(tmp_path / "c.safetensors")
    assert meta["step"] == 7
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v)


def test_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, {"w": torch.ones(4)}, {"step": 1})

    def dies_midway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_file", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, {"w": torch.zeros(4)}, {"step": 2})
    tensors, meta = checkpoint.load(path)
    assert meta["step"] == 1 and torch.equal(tensors["w"], torch.ones(4))
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


def test_corrupt_and_foreign_files_are_named(tmp_path):
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, {"w": torch.ones(100)}, {"step": 1})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="corrupt"):
        checkpoint.load(path)
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(checkpoint.CheckpointError, match="corrupt"):
        checkpoint.load(path)
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(path))
    with pytest.raises(checkpoint.CheckpointError, match="not a TRM checkpoint"):
        checkpoint.load(path)
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
        checkpoint.load(tmp_path / "missing.safetensors")


def reference_state_dict(model: TRM, mlp_t: bool, prefix: str) -> dict[str, torch.Tensor]:
    """A state dict laid out as the reference writes it, keys spelled out by hand."""
    inner = prefix + "model.inner."
    out = {
        inner + "embed_tokens.embedding_weight": model.embed_tokens.embedding_weight,
        inner + "lm_head.weight": model.lm_head.weight,
        inner + "q_head.weight": model.q_head.weight,
        inner + "q_head.bias": model.q_head.bias,
        inner + "puzzle_emb.weights": model.puzzle_emb.weights,
        inner + "H_init": model.y_init.bfloat16(),  # the reference keeps these in bf16
        inner + "L_init": model.z_init.bfloat16(),
    }
    if not mlp_t:
        out[inner + "rotary_emb.cos_cached"] = torch.zeros(3)  # derived; ignored on import
    for i, layer in enumerate(model.net.layers):
        base = f"{inner}L_level.layers.{i}."
        out[base + "mlp.gate_up_proj.weight"] = layer.mlp.gate_up_proj.weight
        out[base + "mlp.down_proj.weight"] = layer.mlp.down_proj.weight
        if mlp_t:
            out[base + "mlp_t.gate_up_proj.weight"] = layer.mlp_t.gate_up_proj.weight
            out[base + "mlp_t.down_proj.weight"] = layer.mlp_t.down_proj.weight
        else:
            out[base + "self_attn.qkv_proj.weight"] = layer.self_attn.qkv_proj.weight
            out[base + "self_attn.o_proj.weight"] = layer.self_attn.o_proj.weight
    return {k: v.detach().clone() for k, v in out.items()}


CFG = dict(vocab_size=6, seq_len=16, hidden_size=32, num_heads=4, puzzle_emb_len=1, num_puzzle_identifiers=3)


@pytest.mark.parametrize("mlp_t", [False, True])
@pytest.mark.parametrize("prefix", ["_orig_mod.", ""])
def test_reference_checkpoint_import_round_trips(tmp_path, mlp_t, prefix):
    torch.manual_seed(0)
    source = TRM(ModelConfig(mlp_t=mlp_t, **CFG))
    source.puzzle_emb.weights.normal_()
    with torch.no_grad():
        source.y_init.copy_(source.y_init.bfloat16().float())
        source.z_init.copy_(source.z_init.bfloat16().float())
    torch.save(reference_state_dict(source, mlp_t, prefix), tmp_path / "ref.pt")
    state = checkpoint.read_reference(tmp_path / "ref.pt")
    torch.manual_seed(1)
    target = TRM(ModelConfig(mlp_t=mlp_t, **CFG))
    checkpoint.load_state_dict_strict(target, state, "ref")
    for (name, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items(), strict=False):
        assert torch.equal(a, b), name


def test_reference_import_lists_unknown_missing_and_misshapen_keys(tmp_path):
    model = TRM(ModelConfig(**CFG))
    state = reference_state_dict(model, False, "")
    del state["model.inner.lm_head.weight"]
    state["model.inner.extra.weight"] = torch.zeros(1)
    state["model.inner.q_head.bias"] = torch.zeros(3)
    torch.save(state, tmp_path / "ref.pt")
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load_state_dict_strict(TRM(ModelConfig(**CFG)), checkpoint.read_reference(tmp_path / "ref.pt"), "x")
    msg = str(e.value)
    assert "missing keys: lm_head.weight" in msg
    assert "unexpected keys: extra.weight" in msg
    assert "q_head.bias: checkpoint (3,) vs model (2,)" in msg


class NotATensor:
    pass


def test_reference_import_never_unpickles_code(tmp_path):
    torch.save({"x": NotATensor()}, tmp_path / "evil.pt")
    with pytest.raises(checkpoint.CheckpointError, match="refused: loading them could run code"):
        checkpoint.read_reference(tmp_path / "evil.pt")


def test_hrm_reference_checkpoint_import_keeps_both_stacks(tmp_path):
    from trm.hrm import HRM

    cfg = ModelConfig(arch="hrm", num_layers=1, **CFG)
    torch.manual_seed(0)
    source = HRM(cfg)
    inner = "_orig_mod.model.inner."
    state = {inner + k: v.detach().clone() for k, v in source.state_dict().items() if not k.endswith("_init")}
    state[inner + "H_init"], state[inner + "L_init"] = source.y_init.clone(), source.z_init.clone()
    assert any(k.startswith(inner + "H_level.layers.0.") for k in state)
    assert any(k.startswith(inner + "L_level.layers.0.") for k in state)
    torch.save(state, tmp_path / "hrm.pt")
    target = HRM(cfg)
    checkpoint.load_state_dict_strict(target, checkpoint.read_reference(tmp_path / "hrm.pt", "hrm"), "hrm")
    for (name, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.skipif(os.name != "posix", reason="POSIX modes")
@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_a_checkpoint_gets_the_mode_of_any_file_the_run_writes(tmp_path, umask):
    """Before: 0600 whatever the umask (safetensors' own), where metrics.jsonl got 0644."""
    previous = os.umask(umask)
    try:
        checkpoint.save(tmp_path / "c.safetensors", {"w": torch.ones(2)}, {"step": 1})
        (tmp_path / "metrics.jsonl").write_text("{}\n")
    finally:
        os.umask(previous)
    mode = stat.S_IMODE((tmp_path / "c.safetensors").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "metrics.jsonl").stat().st_mode) == 0o666 & ~umask
