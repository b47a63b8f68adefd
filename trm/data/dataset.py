"""The on-disk dataset format, building it, and the seeded batch iterator.

Format (one directory)::

    metadata.json                      {"format": "trm-dataset/1", "task", "vocab_size", "seq_len",
                                        "num_puzzle_identifiers", "pad_id": 0, "ignore_label_id": 0,
                                        "splits": {"train": N, "test": M}, ...}
    <split>/inputs.npy                 uint8 [N, seq_len]   token ids
    <split>/labels.npy                 uint8 [N, seq_len]   token ids; ignore_label_id = no loss
    <split>/puzzle_identifiers.npy     int32 [N]            row of the puzzle-embedding table

Arrays are plain ``.npy`` files opened memory-mapped, so a split larger than memory is fine.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import DataConfig
from . import sudoku

FORMAT = "trm-dataset/1"
ARRAYS = {"inputs": np.uint8, "labels": np.uint8, "puzzle_identifiers": np.int32}


class DatasetError(ValueError):
    """A dataset directory that is missing files or whose arrays are malformed."""


@dataclass
class Split:
    inputs: np.ndarray
    labels: np.ndarray
    puzzle_identifiers: np.ndarray

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


def write(out_dir: str | Path, metadata: dict, splits: dict[str, dict[str, np.ndarray]]) -> Path:
    """Write a dataset directory. Refuses to overwrite an existing one."""
    out = Path(out_dir)
    if (out / "metadata.json").exists():
        raise FileExistsError(f"{out} already holds a dataset; choose another --out or delete it first")
    for name, arrays in splits.items():
        (out / name).mkdir(parents=True, exist_ok=True)
        for key, dtype in ARRAYS.items():
            np.save(out / name / f"{key}.npy", np.ascontiguousarray(arrays[key], dtype=dtype))
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
    return Split(**arrays)


class BatchIterator:
    """Seeded shuffled batches, drop-last; its whole state is (epoch, position).

    Epoch e's order is a permutation drawn from (seed, e), so a resumed run continues with
    exactly the batches an uninterrupted one would see. Under data parallelism every
    process draws the same global batch and keeps its own contiguous slice.
    """

    def __init__(self, split: Split, global_batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if global_batch_size % world_size:
            raise ValueError(f"global batch {global_batch_size} is not divisible by {world_size} processes")
        if len(split) < global_batch_size:
            raise ValueError(f"the split has {len(split)} examples, fewer than the global batch {global_batch_size}")
        self.split, self.batch_size, self.seed = split, global_batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng((self.seed, self.epoch)).permutation(len(self.split))

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation()

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.position + self.batch_size > len(self.split):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation()
        index = np.sort(self._order[self.position : self.position + self.batch_size])
        self.position += self.batch_size
        local = self.batch_size // self.world_size
        return self.split.batch(index[self.rank * local : (self.rank + 1) * local])


def build_sudoku(cfg: DataConfig, out_dir: str | Path, progress=None) -> Path:
    """Build a Sudoku dataset from a CSV (cfg.csv) or the built-in generator.

    Training puzzles get `cfg.augmentations` augmented copies each; test puzzles none.
    Generated test puzzles never repeat a training puzzle. Everything is seeded by cfg.seed.
    """
    rng = np.random.default_rng(cfg.seed)
    if cfg.csv:
        train_q, train_a = sudoku.load_csv(cfg.csv, cfg.size)
        if cfg.num_train and cfg.num_train < len(train_q):  # seeded subsample (the reference's is not)
            keep = np.sort(rng.choice(len(train_q), cfg.num_train, replace=False))
            train_q, train_a = train_q[keep], train_a[keep]
        test_q, test_a = sudoku.load_csv(cfg.test_csv, cfg.size) if cfg.test_csv else (train_q[:0], train_a[:0])
        if cfg.num_test and cfg.num_test < len(test_q):
            keep = np.sort(rng.choice(len(test_q), cfg.num_test, replace=False))
            test_q, test_a = test_q[keep], test_a[keep]
    else:
        train_q, train_a, test_q, test_a = _generate_disjoint(cfg, rng, progress)

    aug_q, aug_a = [train_q], [train_a]
    for _ in range(cfg.augmentations):
        pairs = [sudoku.augment(q, a, rng) for q, a in zip(train_q, train_a, strict=False)]
        aug_q.append(np.stack([p[0] for p in pairs]))
        aug_a.append(np.stack([p[1] for p in pairs]))
    train_q, train_a = np.concatenate(aug_q), np.concatenate(aug_a)

    def encode(q: np.ndarray, a: np.ndarray) -> dict[str, np.ndarray]:
        n = len(q)
        return {
            "inputs": q.reshape(n, -1) + 1,
            "labels": a.reshape(n, -1) + 1,
            "puzzle_identifiers": np.zeros(n, dtype=np.int32),
        }

    meta = {
        "task": "sudoku",
        "size": cfg.size,
        "vocab_size": cfg.size + 2,
        "seq_len": cfg.size**2,
        "num_puzzle_identifiers": 1,
        "source": cfg.csv or "generator",
        "seed": cfg.seed,
        "augmentations": cfg.augmentations,
    }
    return write(out_dir, meta, {"train": encode(train_q, train_a), "test": encode(test_q, test_a)})


def _generate_disjoint(cfg: DataConfig, rng: np.random.Generator, progress=None):
    seen: set[bytes] = set()
    grids: list[tuple[np.ndarray, np.ndarray]] = []
    total = cfg.num_train + cfg.num_test
    while len(grids) < total:
        q, a = sudoku.generate(cfg.size, rng, cfg.min_blanks, cfg.min_backtracks)
        if q.tobytes() in seen:
            continue
        seen.add(q.tobytes())
        grids.append((q, a))
        if progress is not None:
            progress(len(grids), total)
    q = np.stack([g[0] for g in grids])
    a = np.stack([g[1] for g in grids])
    return q[: cfg.num_train], a[: cfg.num_train], q[cfg.num_train :], a[cfg.num_train :]
