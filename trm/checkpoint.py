"""Checkpoints: safetensors (never pickle), written atomically; import of reference checkpoints.

A checkpoint is one ``.safetensors`` file. Tensors are namespaced (``model.``, ``ema.``,
``optim.``, ``carry.``, ``rng.``); everything else (config, step, data position) is JSON
in the file's metadata under the key ``trm``.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

FORMAT = "trm-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not fit the model it is loaded into."""


class NonFiniteError(CheckpointError):
    """A checkpoint refused because some of its tensors hold NaN or infinity."""

    def __init__(self, path: Path, names: list[str]):
        self.path, self.names = path, names
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        super().__init__(f"{path} not written: NaN or infinite values in {shown}")


def nonfinite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors holding a NaN or an infinity."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def save(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write atomically: a temporary file in the same directory, fsync, then rename over `path`.

    A process killed mid-save leaves the previous checkpoint intact. Tensors holding NaN or
    infinity are refused (NonFiniteError) before anything is written: a diverged run never
    replaces a good checkpoint.
    """
    path = Path(path)
    cpu = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    if bad := nonfinite(cpu):
        raise NonFiniteError(path, bad)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        mode = _new_file_mode(tmp)
        save_file(cpu, str(tmp), metadata={"trm": json.dumps({"format": FORMAT, **meta})})
        os.chmod(tmp, mode)  # safetensors writes 0600: a checkpoint is readable as every other file of the run
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _new_file_mode(path: Path) -> int:
    """The mode a new file gets at `path`: 0666 less the umask (or as a default ACL has it),
    found by creating it empty (os.umask reads the umask only by setting it, racing other threads)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        return stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)


def load(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("trm")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt or not a safetensors checkpoint: {e}") from None
    if raw is None:
        raise CheckpointError(f"{path} is a safetensors file but not a TRM checkpoint (no 'trm' metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} has corrupt metadata: {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return tensors, meta


def section(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix.``, with the prefix removed."""
    return {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def load_state_dict_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict with an error that lists missing/unexpected keys and shape mismatches."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = [f"{source} does not fit the model:"]
        if missing:
            parts.append("  missing keys: " + ", ".join(missing))
        if unexpected:
            parts.append("  unexpected keys: " + ", ".join(unexpected))
        if shapes:
            parts.append("  shape mismatches: " + "; ".join(shapes))
        raise CheckpointError("\n".join(parts))
    module.load_state_dict(state)


# reference name -> ours, applied in order after the wrappers are stripped
_REFERENCE_RENAMES = [(r"^H_init$", "y_init"), (r"^L_init$", "z_init")]
_TRM_NET = (r"^L_level\.", "net.")  # TRM's one net; HRM keeps its H_level and L_level
_REFERENCE_IGNORED = re.compile(r"^rotary_emb\.")  # cached cos/sin, derived from the config


def reference_to_ours(state: dict[str, torch.Tensor], arch: str = "trm") -> dict[str, torch.Tensor]:
    """Rename a reference (SamsungSAILMontreal/TinyRecursiveModels) state dict to our keys.

    Accepts keys with or without ``_orig_mod.`` (torch.compile) and ``model.inner.`` prefixes.
    `arch` is the model's ("trm" or "hrm").
    """
    renames = _REFERENCE_RENAMES + ([_TRM_NET] if arch == "trm" else [])
    out = {}
    for key, value in state.items():
        name = re.sub(r"^(_orig_mod\.)?(model\.)?(inner\.)?", "", key)
        if _REFERENCE_IGNORED.match(name):
            continue
        for pattern, repl in renames:
            name = re.sub(pattern, repl, name)
        out[name] = value.float() if value.is_floating_point() else value
    return out


def _is_ours(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            return "trm" in (f.metadata() or {})
    except (SafetensorError, OSError, ValueError):
        return False


def read_reference(path: str | Path, arch: str = "trm") -> dict[str, torch.Tensor]:
    """Load a reference checkpoint safely (``weights_only=True``: no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no reference checkpoint at {path}")
    if _is_ours(path):
        raise CheckpointError(f"{path} is already a trm checkpoint: use it as it is (trm eval {path}); "
                              "import-reference converts the reference implementation's torch.save files")  # fmt: skip
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or unsafe pickles (a KeyError '101' for text)
        if "Weights only load failed" in str(e):
            raise CheckpointError(f"{path} holds Python objects besides tensors; refused: loading them could run "
                                  "code (torch.load with weights_only=True)") from None  # fmt: skip
        detail = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (torch.load raised {type(e).__name__}: "
                              f"{detail[:200]})") from None  # fmt: skip
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a flat state dict of tensors")
    return reference_to_ours(state, arch)
