"""Building datasets (generated or from CSVs), and the seeded batch iterator.

The on-disk format is :mod:`trm.data.store`'s; its names are re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import DataConfig, RunConfig
from . import arc, maze, sudoku
from .grids import dihedral
from .store import ARRAYS, FORMAT, DatasetError, Split, load_split, read_metadata, write

__all__ = ["ARRAYS", "FORMAT", "DatasetError", "Split", "load_split", "read_metadata", "write", "BatchIterator",
           "build", "configure_model", "source_of"]  # fmt: skip


def configure_model(cfg: RunConfig, data_dir: str | Path) -> None:
    """Take vocabulary, sequence length and puzzle count from the dataset."""
    meta = read_metadata(data_dir)
    cfg.model.vocab_size = meta["vocab_size"]
    cfg.model.seq_len = meta["seq_len"]
    cfg.model.num_puzzle_identifiers = meta["num_puzzle_identifiers"]


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
    return arc.recorded_source(cfg) if cfg.task in arc.SOURCES else cfg.csv or "generator"


def build(cfg: DataConfig, out_dir: str | Path, progress=None) -> Path:
    """Build a dataset for a grid task (cfg.task) from CSVs (cfg.csv, cfg.test_csv) or its generator.

    Training puzzles get their augmented variants (Sudoku: cfg.augmentations random
    transforms; maze: the 7 other dihedral images if cfg.dihedral); test puzzles none.
    Generated test puzzles never repeat a training puzzle. Everything is seeded by cfg.seed.
    ``progress(stage, done, total)``, if given, is called as puzzles are generated and augmented.
    """
    if cfg.task in arc.SOURCES:
        return arc.build(cfg, out_dir, progress)
    if cfg.task not in TASKS:
        raise ValueError(f"cannot build {cfg.task!r} data; tasks: {', '.join([*TASKS, *arc.SOURCES])}")
    task = TASKS[cfg.task]
    rng = np.random.default_rng(cfg.seed)
    test_source = ""
    if cfg.csv and cfg.test_csv:
        train_q, train_a = _subsample(*task.load_csv(cfg.csv, cfg.size), cfg.num_train, rng)
        test_q, test_a = _subsample(*task.load_csv(cfg.test_csv, cfg.size), cfg.num_test, rng)
    elif cfg.csv:  # no test CSV: hold out num_test of the training CSV's puzzles
        q, a = task.load_csv(cfg.csv, cfg.size)
        if cfg.num_test >= len(q):
            raise ValueError(f"{cfg.csv} has {len(q)} puzzles: too few to hold out data.num_test={cfg.num_test} "
                             "for testing and train on the rest")  # fmt: skip
        order = rng.permutation(len(q))
        held, rest = np.sort(order[: cfg.num_test]), np.sort(order[cfg.num_test :])
        test_q, test_a = q[held], a[held]
        train_q, train_a = _subsample(q[rest], a[rest], cfg.num_train, rng)
        test_source = f"held out from {cfg.csv}, disjoint from training" if cfg.num_test else "none: data.num_test=0"
    else:
        train_q, train_a, test_q, test_a = _generate_disjoint(task, cfg, rng, progress)

    pairs = []
    for done, (q0, a0) in enumerate(zip(train_q, train_a, strict=True), 1):
        pairs += task.variants(q0, a0, cfg, rng)
        if progress is not None and (done % 100 == 0 or done == len(train_q)) and pairs:
            progress("augmenting", done, len(train_q))
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
    if test_source:
        meta["test_source"] = test_source
    return write(out_dir, meta, {"train": encode(train_q, train_a), "test": encode(test_q, test_a)})


def _subsample(q: np.ndarray, a: np.ndarray, count: int, rng: np.random.Generator):
    """A seeded subsample of `count` rows (all when count is 0 or larger); the reference's is unseeded."""
    if not count or count >= len(q):
        return q, a
    keep = np.sort(rng.choice(len(q), count, replace=False))
    return q[keep], a[keep]


def _canonical(grid: np.ndarray) -> bytes:
    """One key for a grid and its 7 other dihedral images: a test maze is never an image of a
    training maze (with data.dihedral those images are in the training split)."""
    return min(dihedral(grid, k).tobytes() for k in range(8))


def _generate_disjoint(task: GridTask, cfg: DataConfig, rng: np.random.Generator, progress=None):
    seen: set[bytes] = set()
    grids: list[tuple[np.ndarray, np.ndarray]] = []
    total = cfg.num_train + cfg.num_test
    while len(grids) < total:
        q, a = task.generate(cfg, rng)
        key = _canonical(q) if cfg.task == "maze" else q.tobytes()
        if key in seen:
            continue
        seen.add(key)
        grids.append((q, a))
        if progress is not None:
            progress("generating", len(grids), total)
    q = np.stack([g[0] for g in grids])
    a = np.stack([g[1] for g in grids])
    return q[: cfg.num_train], a[: cfg.num_train], q[cfg.num_train :], a[cfg.num_train :]
