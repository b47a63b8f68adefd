"""The on-disk dataset format: writing a dataset directory, reading its metadata and splits.

Format (one directory)::

    metadata.json                      {"format": "trm-dataset/1", "task", "vocab_size", "seq_len",
                                        "num_puzzle_identifiers", "pad_id": 0, "ignore_label_id": 0,
                                        "splits": {"train": N, "test": M}, ...}
    <split>/inputs.npy                 uint8 [N, seq_len]   token ids
    <split>/labels.npy                 uint8 [N, seq_len]   token ids; ignore_label_id = no loss
    <split>/puzzle_identifiers.npy     int32 [N]            row of the puzzle-embedding table
    <split>/groups.npy                 int32 [N], optional  the original puzzle a row is a variant of

ARC datasets also hold identifiers.json and test_targets.json (see trm/data/arc.py).

Arrays are plain ``.npy`` files opened memory-mapped, so a split larger than memory is fine.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = "trm-dataset/1"
ARRAYS = {"inputs": np.uint8, "labels": np.uint8, "puzzle_identifiers": np.int32}


class DatasetError(ValueError):
    """A dataset directory that is missing files or whose arrays are malformed."""


@dataclass
class Split:
    inputs: np.ndarray
    labels: np.ndarray
    puzzle_identifiers: np.ndarray
    groups: np.ndarray | None = None  # optional int32 [N]: which original puzzle a row is a variant of

    def __len__(self) -> int:
        return len(self.inputs)

    def batch(self, index: np.ndarray) -> dict[str, np.ndarray]:
        """Rows `index` as model inputs: labels equal to ignore_label_id (0) become -100."""
        labels = self.labels[index].astype(np.int64)
        labels[labels == 0] = -100
        return {
            "inputs": self.inputs[index].astype(np.int64),
            "labels": labels,
            "puzzle_identifiers": self.puzzle_identifiers[index].astype(np.int64),
        }


def write(
    out_dir: str | Path, metadata: dict, splits: dict[str, dict[str, np.ndarray]], extra: dict[str, str] | None = None
) -> Path:
    """Write a dataset directory (with `extra` text files: name -> contents). Refuses to
    overwrite an existing one."""
    out = Path(out_dir)
    if (out / "metadata.json").exists():
        raise FileExistsError(f"{out} already holds a dataset; choose another --out or delete it first")
    for name, arrays in splits.items():
        (out / name).mkdir(parents=True, exist_ok=True)
        for key, dtype in ARRAYS.items():
            np.save(out / name / f"{key}.npy", np.ascontiguousarray(arrays[key], dtype=dtype))
        if "groups" in arrays:
            np.save(out / name / "groups.npy", np.ascontiguousarray(arrays["groups"], dtype=np.int32))
    for name, text in (extra or {}).items():
        (out / name).write_text(text)
    meta = {"format": FORMAT, "pad_id": 0, "ignore_label_id": 0, **metadata}
    meta["splits"] = {name: int(len(arrays["inputs"])) for name, arrays in splits.items()}
    tmp = out / "metadata.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, out / "metadata.json")  # written last: a half-built directory has none
    return out


def read_metadata(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "metadata.json"
    if not path.is_file():
        raise DatasetError(f"{data_dir} is not a dataset directory (no metadata.json); build one with `trm build`")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path} is not valid JSON: {e}") from None
    if meta.get("format") != FORMAT:
        raise DatasetError(f"{path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    for key in ("vocab_size", "seq_len", "num_puzzle_identifiers", "splits"):
        if key not in meta:
            raise DatasetError(f"{path} lacks {key!r}")
    return meta


def load_split(data_dir: str | Path, split: str) -> Split:
    """Open a split memory-mapped, checking shapes, dtypes and value ranges."""
    meta = read_metadata(data_dir)
    if split not in meta["splits"]:
        raise DatasetError(f"{data_dir} has no split {split!r} (has {', '.join(meta['splits'])})")
    arrays = {}
    for key, dtype in ARRAYS.items():
        path = Path(data_dir) / split / f"{key}.npy"
        try:
            arrays[key] = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise DatasetError(f"cannot read {path}: {e}") from None
        if arrays[key].dtype != dtype:
            raise DatasetError(f"{path} has dtype {arrays[key].dtype}, expected {np.dtype(dtype)}")
    n, seq = meta["splits"][split], meta["seq_len"]
    for key in ("inputs", "labels"):
        if arrays[key].shape != (n, seq):
            raise DatasetError(f"{data_dir}/{split}/{key}.npy has shape {arrays[key].shape}, expected {(n, seq)}")
        if n and int(arrays[key].max()) >= meta["vocab_size"]:
            raise DatasetError(f"{data_dir}/{split}/{key}.npy has token ids >= vocab_size {meta['vocab_size']}")
    ids = arrays["puzzle_identifiers"]
    if ids.shape != (n,):
        raise DatasetError(f"{data_dir}/{split}/puzzle_identifiers.npy has shape {ids.shape}, expected {(n,)}")
    if n and not 0 <= int(ids.min()) <= int(ids.max()) < meta["num_puzzle_identifiers"]:
        raise DatasetError(f"{data_dir}/{split}/puzzle_identifiers.npy is outside [0, num_puzzle_identifiers)")
    groups_path = Path(data_dir) / split / "groups.npy"
    if groups_path.exists():
        arrays["groups"] = np.load(groups_path, mmap_mode="r")
        if arrays["groups"].shape != (n,):
            raise DatasetError(f"{groups_path} has shape {arrays['groups'].shape}, expected {(n,)}")
    return Split(**arrays)
