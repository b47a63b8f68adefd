"""The on-disk dataset format, building it, and the seeded batch iterator.

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import DataConfig
from . import arc, maze, sudoku
from .grids import dihedral

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


def write(out_dir: str | Path, metadata: dict, splits: dict[str, dict[str, np.ndarray]]) -> Path:
    """Write a dataset directory. Refuses to overwrite an existing one."""
    out = Path(out_dir)
    if (out / "metadata.json").exists():
        raise FileExistsError(f"{out} already holds a dataset; choose another --out or delete it first")
    for name, arrays in splits.items():
        (out / name).mkdir(parents=True, exist_ok=True)
        for key, dtype in ARRAYS.items():
            np.save(out / name / f"{key}.npy", np.ascontiguousarray(arrays[key], dtype=dtype))
        if "groups" in arrays:
            np.save(out / name / "groups.npy", np.ascontiguousarray(arrays["groups"], dtype=np.int32))
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


@dataclass(frozen=True)
class GridTask:
    """What building a dataset needs to know about a grid task. Grids hold codes; token = code + 1."""

    vocab_size: int
    load_csv: Callable[[str, int], tuple[np.ndarray, np.ndarray]]
    generate: Callable[[DataConfig, np.random.Generator], tuple[np.ndarray, np.ndarray]]
    variants: Callable[[np.ndarray, np.ndarray, DataConfig, np.random.Generator], list[tuple[np.ndarray, np.ndarray]]]


def _sudoku_variants(q, a, cfg, rng):
    return [sudoku.augment(q, a, rng) for _ in range(cfg.augmentations)]


def _maze_variants(q, a, cfg, rng):
    return [(dihedral(q, k), dihedral(a, k)) for k in range(1, 8)] if cfg.dihedral else []


TASKS = {
    "sudoku": GridTask(
        vocab_size=0,  # size + 2: set per dataset
        load_csv=sudoku.load_csv,
        generate=lambda cfg, rng: sudoku.generate(cfg.size, rng, cfg.min_blanks, cfg.min_backtracks),
        variants=_sudoku_variants,
    ),
    "maze": GridTask(
        vocab_size=len(maze.CHARS) + 1,
        load_csv=maze.load_csv,
        generate=lambda cfg, rng: maze.generate(cfg.size, rng, cfg.min_path_length),
        variants=_maze_variants,
    ),
}


def source_of(cfg: DataConfig) -> str:
    """What a dataset built from `cfg` records as its source (and what reuse checks against)."""
    if cfg.task in arc.SOURCES:
        return ",".join([cfg.arc_dir or cfg.task, *arc.extra_dirs(cfg)])
    return cfg.csv or "generator"


def build(cfg: DataConfig, out_dir: str | Path, progress=None) -> Path:
    """Build a dataset for a grid task (cfg.task) from CSVs (cfg.csv, cfg.test_csv) or its generator.

    Training puzzles get their augmented variants (Sudoku: cfg.augmentations random
    transforms; maze: the 7 other dihedral images if cfg.dihedral); test puzzles none.
    Generated test puzzles never repeat a training puzzle. Everything is seeded by cfg.seed.
    """
    if cfg.task in arc.SOURCES:
        return arc.build(cfg, out_dir)
    if cfg.task not in TASKS:
        raise ValueError(f"cannot build {cfg.task!r} data; tasks: {', '.join([*TASKS, *arc.SOURCES])}")
    task = TASKS[cfg.task]
    rng = np.random.default_rng(cfg.seed)
    if cfg.csv:
        train_q, train_a = _subsample(*task.load_csv(cfg.csv, cfg.size), cfg.num_train, rng)
        if cfg.test_csv:
            test_q, test_a = _subsample(*task.load_csv(cfg.test_csv, cfg.size), cfg.num_test, rng)
        else:
            test_q, test_a = train_q[:0], train_a[:0]
    else:
        train_q, train_a, test_q, test_a = _generate_disjoint(task, cfg, rng, progress)

    pairs = [(q, a) for q0, a0 in zip(train_q, train_a, strict=True) for q, a in task.variants(q0, a0, cfg, rng)]
    if pairs:
        train_q = np.concatenate([train_q, np.stack([p[0] for p in pairs])])
        train_a = np.concatenate([train_a, np.stack([p[1] for p in pairs])])

    def encode(q: np.ndarray, a: np.ndarray) -> dict[str, np.ndarray]:
        n = len(q)
        return {"inputs": q.reshape(n, -1) + 1, "labels": a.reshape(n, -1) + 1,
                "puzzle_identifiers": np.zeros(n, dtype=np.int32)}  # fmt: skip

    meta = {"task": cfg.task, "size": cfg.size, "vocab_size": task.vocab_size or cfg.size + 2,
            "seq_len": cfg.size**2, "num_puzzle_identifiers": 1, "source": source_of(cfg),
            "seed": cfg.seed, "augmentations": cfg.augmentations, "dihedral": cfg.dihedral}  # fmt: skip
    return write(out_dir, meta, {"train": encode(train_q, train_a), "test": encode(test_q, test_a)})


def _subsample(q: np.ndarray, a: np.ndarray, count: int, rng: np.random.Generator):
    """A seeded subsample of `count` rows (all when count is 0 or larger); the reference's is unseeded."""
    if not count or count >= len(q):
        return q, a
    keep = np.sort(rng.choice(len(q), count, replace=False))
    return q[keep], a[keep]


def _generate_disjoint(task: GridTask, cfg: DataConfig, rng: np.random.Generator, progress=None):
    seen: set[bytes] = set()
    grids: list[tuple[np.ndarray, np.ndarray]] = []
    total = cfg.num_train + cfg.num_test
    while len(grids) < total:
        q, a = task.generate(cfg, rng)
        if q.tobytes() in seen:
            continue
        seen.add(q.tobytes())
        grids.append((q, a))
        if progress is not None:
            progress(len(grids), total)
    q = np.stack([g[0] for g in grids])
    a = np.stack([g[1] for g in grids])
    return q[: cfg.num_train], a[: cfg.num_train], q[cfg.num_train :], a[cfg.num_train :]
