"""Training: one supervision step per optimizer step, the ACT carry kept across steps.

Single process, or several under ``torchrun`` (DistributedDataParallel; NCCL on GPUs,
gloo on CPU). A run directory holds ``config.json``, ``metrics.jsonl``,
``checkpoint.safetensors`` and ``metrics.png``.

A run whose loss or gradients turn NaN or infinite stops (``Trainer.diverged``) and keeps its
last good checkpoint: each step folds its finiteness into a flag on the device, read on the
host only at log steps and before checkpoints, and no checkpoint is written with non-finite
tensors.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint, distributed
from .arch import build_model
from .config import RunConfig
from .data.dataset import BatchIterator, configure_model, load_split
from .distributed import all_gather_cat
from .evaluate import evaluate, evaluate_adaptive, to_device
from .losses import act_loss
from .model import Carry
from .optim import EMA, AdamATan2, SparseSignSGD, warmup_lr
from .plot import plot_metrics
from .signals import StopSignals

CHECKPOINT = "checkpoint.safetensors"
_CARRY_FIELDS = ("y", "z", "steps", "halted")
_ALL_FINITE = 2**62  # Trainer's first-non-finite-step flag while every step has been finite
# what became non-finite: the loss or gradients (the flag), or the state a checkpoint would have held
NONFINITE = {"loss_or_gradients": "the loss or gradient norm", "state": "the weights, EMA or optimizer state"}


@dataclass
class Divergence:
    """Where a run went non-finite (NaN or infinity) and the checkpoint it kept."""

    what: str  # a key of NONFINITE: "loss_or_gradients", or "state" (in the tensors of a checkpoint to be written)
    from_step: int  # the window in which it happened: the steps after the last check that found all finite
    to_step: int
    first_step: int | None  # the first step whose loss or gradients were non-finite ("state": not known)
    checkpoint: Path  # the last good checkpoint, untouched since it was written
    checkpoint_step: int
    initial: bool  # no checkpoint had been written: the run's initial state (step 0) was, so that it can restart


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device) from torchrun's environment, or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def _data_parallel(model: torch.nn.Module) -> DistributedDataParallel:
    """DDP without per-forward buffer broadcasts: the puzzle-embedding table is updated
    identically on every process by the sparse optimizer, never by rank 0 alone."""
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        return DistributedDataParallel(model, forward_sync_buffers=False)
    return DistributedDataParallel(model, broadcast_buffers=False)


class Trainer:
    check_finite = True  # fold each step's finiteness into a device-side flag (off: only checkpoints are checked)

    def __init__(
        self,
        cfg: RunConfig,
        data_dir: str | Path,
        out_dir: str | Path,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
    ):
        configure_model(cfg, data_dir)
        self.cfg, self.out_dir, self.data_dir, self.device = cfg, Path(out_dir), Path(data_dir).resolve(), device
        self.rank, self.world_size = rank, world_size
        t = cfg.train
        torch.manual_seed(t.seed)  # identical initial weights on every process
        self.model = build_model(cfg.model).to(device)
        self.module = _data_parallel(self.model) if world_size > 1 else self.model
        # model.compile: the forward of a training step through torch.compile; our ops are custom
        # ops Inductor does not trace into, and it fuses what lies between them
        self.forward = torch.compile(self.module) if cfg.model.compile else self.module
        self.optimizer = AdamATan2(
            self.model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay
        )
        self.sparse = (
            SparseSignSGD(self.model.puzzle_emb, t.puzzle_emb_lr, t.puzzle_emb_weight_decay)
            if cfg.model.puzzle_emb_len > 0
            else None
        )
        self.ema = EMA(self.model, t.ema_rate) if t.ema_rate > 0 else None
        self.train_split, self.test_split = load_split(data_dir, "train"), load_split(data_dir, "test")
        self.batches = BatchIterator(self.train_split, t.global_batch_size, t.seed, rank, world_size)
        self.step = 0
        self.carry: Carry | None = None
        self.stopped_by: str | None = None  # the signal that stopped the last fit(), if one did
        self.diverged: Divergence | None = None  # set when the last fit() stopped on a non-finite loss or state
        self.saved_step: int | None = None  # the step of the checkpoint this run last wrote or loaded
        self._loss: torch.Tensor | None = None
        self._first_nonfinite = torch.full((), _ALL_FINITE, dtype=torch.int64, device=device)
        torch.manual_seed(t.seed + 1 + rank)  # the halting-exploration stream, one per process
        if rank == 0:  # created only once everything above has been checked
            self.out_dir.mkdir(parents=True, exist_ok=True)

    # one optimizer step -------------------------------------------------------------------------
    def train_step(self) -> dict[str, torch.Tensor]:
        metrics = self.forward_backward()
        self.optimizer_step()
        return metrics

    def forward_backward(self) -> dict[str, torch.Tensor]:
        """One supervision step on the next batch, gradients accumulated (under DDP, averaged)."""
        t = self.cfg.train
        batch = to_device(next(self.batches), self.device)
        if self.carry is None:
            self.carry = self.model.initial_carry(batch)
        self.carry, outputs = self.forward(self.carry, batch)
        loss, metrics = act_loss(outputs, self.carry, t.loss)
        # DDP averages gradients over processes; the loss is a sum over the global batch
        (loss * (self.world_size / t.global_batch_size)).backward()
        self._loss = loss.detach()
        return metrics

    def optimizer_step(self) -> None:
        t = self.cfg.train
        self.step += 1
        if self.check_finite:
            self._track_finite()
        for group in self.optimizer.param_groups:
            group["lr"] = warmup_lr(t.lr, self.step, t.lr_warmup_steps)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.sparse is not None:
            self.sparse.lr = warmup_lr(t.puzzle_emb_lr, self.step, t.lr_warmup_steps)
            self.sparse.step()
            self.sparse.zero_grad()
        if self.ema is not None:
            self.ema.update(self.model)

    @torch.no_grad()
    def _track_finite(self) -> None:
        """Fold this step's loss and gradients into the device-side flag: the first step at which
        one held NaN or infinity. The gradients' inf-norm (their largest magnitude) is NaN or
        infinite exactly when one of them is, and no large finite gradient overflows it. On the
        device, no host sync; the values the optimizer reads are not touched."""
        values = [] if self._loss is None else [self._loss]
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if self.sparse is not None and self.model.puzzle_emb.local_weights is not None:
            grads += [g for g in (self.model.puzzle_emb.local_weights.grad,) if g is not None]
        if grads:
            values += torch._foreach_norm(grads, float("inf"))
        self._loss = None
        if values:
            ok = torch.isfinite(torch.stack(values)).all()
            torch.minimum(self._first_nonfinite, torch.where(ok, _ALL_FINITE, self.step), out=self._first_nonfinite)

    def first_nonfinite_step(self) -> int | None:
        """The first step whose loss or gradients held NaN or infinity on any process, None while
        all were finite. One host sync (under DDP an all-reduce, so that every process agrees):
        fit reads it at log steps and before checkpoints only. Collective under DDP."""
        if not self.check_finite:
            return None
        flag = self._first_nonfinite.clone()
        if distributed.active():
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        first = int(flag.item())
        return None if first >= _ALL_FINITE else first

    def restart(self) -> None:
        """Back to the state the run started from at step 0: the same initial weights (the same
        seed), no optimizer state, the first batches and the same random streams."""
        t = self.cfg.train
        torch.manual_seed(t.seed)
        self.model.load_state_dict(build_model(self.cfg.model).state_dict())
        self.optimizer.state.clear()
        self.ema = EMA(self.model, t.ema_rate) if t.ema_rate > 0 else None
        self.batches = BatchIterator(self.train_split, t.global_batch_size, t.seed, self.rank, self.world_size)
        self.step, self.carry, self._loss = 0, None, None
        self._first_nonfinite.fill_(_ALL_FINITE)
        torch.manual_seed(t.seed + 1 + self.rank)

    def evaluate(self, steps: int | None = None) -> dict[str, float]:
        """Test-split accuracy with the EMA weights (adaptive when train.eval_halt is set)."""
        t = self.cfg.train
        steps = steps or t.eval_steps or None
        with self.ema.applied(self.model) if self.ema is not None else contextlib.nullcontext():
            if t.eval_halt:
                result = evaluate_adaptive(self.model, self.test_split, t.eval_batch_size, steps,
                                           t.eval_halt_threshold)  # fmt: skip
                return {k: v for k, v in result.items() if k != "steps_histogram"}
            return evaluate(self.model, self.test_split, t.eval_batch_size, steps)

    # checkpoints -----------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything needed to continue exactly. Collective under DDP: call on every process."""
        out = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        if self.ema is not None:
            out |= {f"ema.{k}": v for k, v in self.ema.shadow.items()}
        for name, p in self.model.named_parameters():
            out |= {f"optim.{name}.{k}": v for k, v in self.optimizer.state.get(p, {}).items()}
        if self.carry is not None:
            out |= {f"carry.{k}": all_gather_cat(getattr(self.carry, k)) for k in _CARRY_FIELDS}
            out |= {f"carry.data.{k}": all_gather_cat(v) for k, v in self.carry.data.items()}
        out["rng.cpu"] = all_gather_cat(torch.get_rng_state()[None].to(self.device)).cpu()
        if self.device.type == "cuda":
            out["rng.cuda"] = all_gather_cat(torch.cuda.get_rng_state(self.device)[None].to(self.device)).cpu()
        return out

    def save(self) -> Path:
        """Write the checkpoint (rank 0). Collective under DDP: call on every process. Raises
        checkpoint.NonFiniteError on every process, writing nothing, if a tensor to be saved holds
        NaN or infinity."""
        tensors = self.state_tensors()
        path = self.out_dir / CHECKPOINT
        bad = checkpoint.nonfinite(tensors)
        if distributed.active():  # the state is the same everywhere; agree all the same, so that none waits
            flag = torch.tensor([len(bad)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            bad = bad or (["the state of another process"] if flag.item() else [])
        if bad:
            raise checkpoint.NonFiniteError(path, bad)
        if self.rank == 0:
            meta = {
                "config": self.cfg.to_dict(),
                "step": self.step,
                "data": self.batches.state(),
                "data_dir": str(self.data_dir),
                "world_size": self.world_size,
            }
            checkpoint.save(path, tensors, meta)  # checks the tensors it writes once more
        self.saved_step = self.step
        return path

    def load(self, path: str | Path) -> None:
        tensors, meta = checkpoint.load(path)
        if meta["world_size"] != self.world_size:
            raise checkpoint.CheckpointError(
                f"{path} was written by {meta['world_size']} process(es); resume with the same number "
                f"(now {self.world_size}) to continue exactly"
            )
        checkpoint.load_state_dict_strict(self.model, checkpoint.section(tensors, "model"), str(path))
        if self.ema is not None:
            ema = checkpoint.section(tensors, "ema")
            if set(ema) != set(self.ema.shadow):
                raise checkpoint.CheckpointError(f"{path}: EMA weights do not match the model")
            self.ema.shadow = {k: v.to(self.device) for k, v in ema.items()}
        optim = checkpoint.section(tensors, "optim")
        for name, p in self.model.named_parameters():
            state = {
                k: optim[f"{name}.{k}"].to(self.device)
                for k in ("step", "exp_avg", "exp_avg_sq")
                if f"{name}.{k}" in optim
            }
            if state:
                self.optimizer.state[p] = state
        self.step = self.saved_step = int(meta["step"])
        self.batches.load_state(meta["data"])
        if tensors.get("carry.y") is not None and len(tensors["carry.y"]) == self.cfg.train.global_batch_size:
            local = self.cfg.train.global_batch_size // self.world_size
            rows = slice(self.rank * local, (self.rank + 1) * local)
            fields = {k: tensors[f"carry.{k}"][rows].to(self.device) for k in _CARRY_FIELDS}
            data = {k: v[rows].to(self.device) for k, v in checkpoint.section(tensors, "carry.data").items()}
            self.carry = Carry(**fields, data=data)
        # a copy of the row: set_rng_state reads a view of rank > 0 from its storage's start
        torch.set_rng_state(tensors["rng.cpu"][self.rank].clone())
        if self.device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"][self.rank].clone(), self.device)


def reduce_metrics(metrics: dict[str, torch.Tensor]) -> dict[str, float | None]:
    """Sum over processes, then turn sums over halted slots into means (one host sync).
    A window in which no slot halted has no accuracy: those means are None, not 0."""
    keys = list(metrics)
    values = torch.stack([metrics[k].double() for k in keys])
    if distributed.active():
        dist.all_reduce(values)
    sums = dict(zip(keys, values.tolist(), strict=False))
    count = sums.pop("count")
    out = {k: sums[k] / count if count else None for k in ("accuracy", "exact_accuracy", "q_halt_accuracy", "steps")}
    out["halted"] = count
    out |= {k: sums[k] for k in ("lm_loss", "halt_loss")}
    return out


class MetricsLog:
    """Append-only JSONL of training and evaluation records (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps({"time": time.time(), **record}) + "\n")

    def truncate_after(self, step: int) -> int:
        """Drop the records of steps after `step` (a crashed run's, which a resumed run logs
        again); returns how many were dropped. Rewritten atomically."""
        if not (self.enabled and self.path.exists()):
            return 0
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        keep = [line for line in lines if _record_step(line) <= step]
        if len(keep) < len(lines):
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            os.replace(tmp, self.path)
        return len(lines) - len(keep)


def _record_step(line: str) -> float:
    try:
        return float(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 0  # a torn last line of a killed run: kept, the reader skips it


def _stats(m: dict[str, float | None]) -> str:
    if m["accuracy"] is None:  # no example halted in this window (e.g. the first steps after a resume)
        return f"loss {m['lm_loss']:.3f}  (none halted)"
    return f"loss {m['lm_loss']:.3f}  acc {m['accuracy']:.3f}  exact {m['exact_accuracy']:.3f}  steps {m['steps']:.1f}"


def _progress_line(step: int, total: int, elapsed: float, done: int, m: dict[str, float]) -> str:
    """One plain progress line; `done` steps took `elapsed` seconds in this process."""
    left = elapsed / max(done, 1) * (total - step)
    duration = lambda s: str(datetime.timedelta(seconds=int(s)))  # noqa: E731
    return f"step {step}/{total}  {_stats(m)}  elapsed {duration(elapsed)}  left ~{duration(left)}"


def fit(
    trainer: Trainer, show_progress: bool = True, console: Console | None = None, signals: StopSignals | None = None
) -> dict[str, float]:
    """Train to cfg.train.steps; log, evaluate and checkpoint on schedule. Returns the last evaluation.

    Progress is a live bar on a terminal and one plain line per log interval otherwise (a
    pipe, a log file, a job scheduler). Checkpoints are written every
    ``checkpoint_interval`` steps, every ``checkpoint_minutes`` of wall time, at the end, and
    when SIGINT or SIGTERM stops the run (``trainer.stopped_by`` then names the signal); a
    second signal aborts at once (KeyboardInterrupt). `signals`: the StopSignals of a caller
    that holds them for longer than the training (``trm train``: from its start), else fit's own.
    Metric sums stay on the device between log steps.

    A run whose loss or gradients become non-finite stops at the next log step or checkpoint
    (``trainer.diverged`` then says where, and which checkpoint it kept); so does one whose
    checkpoint would hold non-finite weights, EMA or optimizer state. The checkpoint on disk is
    then the last good one; if none had been written, the run's initial state is.
    """
    t, main = trainer.cfg.train, trainer.rank == 0
    console = console or Console(soft_wrap=True)
    log = MetricsLog(trainer.out_dir / "metrics.jsonl", main)
    live = show_progress and main and console.is_terminal
    columns = (
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[stats]}"),
    )
    last_eval: dict[str, float] = {}
    pending: dict[str, torch.Tensor] | None = None
    since_log, first_step = 0, trainer.step
    # the last steps known good: of the loss and gradients (the flag read), of the state (a checkpoint)
    checked = state_checked = trainer.step
    diverged: tuple[str, int, int | None] | None = None  # (what, from_step, first non-finite step)
    trainer.diverged = None

    def log_window(step: int, **extra) -> dict[str, float | None]:
        m = reduce_metrics(pending)
        for k in ("lm_loss", "halt_loss"):
            m[k] /= since_log * t.global_batch_size
        m["lr"] = trainer.optimizer.param_groups[0]["lr"]
        log.write({"split": "train", "step": step, "window": since_log, **m, **extra})
        return m

    started = last_save = time.monotonic()
    with (
        Progress(*columns, console=console, disable=not live) as bar,
        contextlib.nullcontext(signals) if signals is not None else StopSignals() as stop,
        _training(stop),
    ):
        task = bar.add_task("train", total=t.steps, completed=trainer.step, stats="")
        while trainer.step < t.steps:
            stop.raise_pending()
            metrics = trainer.train_step()
            pending = metrics if pending is None else {k: pending[k] + metrics[k] for k in metrics}
            since_log += 1
            step, final = trainer.step, trainer.step == t.steps
            logged = step % t.log_interval == 0 or final
            if logged:
                first = trainer.first_nonfinite_step()
                if first is not None:
                    diverged = ("loss_or_gradients", checked + 1, first)
                    break
                checked = step
                m = log_window(step)
                if live:
                    bar.update(task, completed=step, stats=_stats(m))
                elif show_progress and main:
                    console.print(_progress_line(step, t.steps, time.monotonic() - started, step - first_step, m))
                pending, since_log = None, 0
            if (step % t.eval_interval == 0 or final) and len(trainer.test_split):
                last_eval = trainer.evaluate()
                log.write({"split": "test", "step": step, **last_eval})
                if main:
                    bar.console.print(
                        f"step {step}: test exact accuracy {last_eval['exact_accuracy']:.4f}, "
                        f"token accuracy {last_eval['accuracy']:.4f} ({int(last_eval['count'])} puzzles)"
                    )
            # under several processes the wall clock and signals are agreed on at log steps only
            stopping, overdue = (
                stop.received is not None,
                t.checkpoint_minutes > 0 and (time.monotonic() - last_save >= 60 * t.checkpoint_minutes),
            )
            if distributed.active() and not logged:
                stopping = overdue = False
            elif distributed.active():
                flags = torch.tensor([stopping, overdue], dtype=torch.int32, device=trainer.device)
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                stopping, overdue = (bool(v) for v in flags.tolist())
            if step % t.checkpoint_interval == 0 or final or stopping or overdue:
                first = None if logged else trainer.first_nonfinite_step()  # read at this step already if logged
                if first is not None:
                    diverged = ("loss_or_gradients", checked + 1, first)
                    break
                checked = step
                try:
                    trainer.save()
                except checkpoint.NonFiniteError:  # on every process alike
                    diverged = ("state", state_checked + 1, None)
                    break
                state_checked, last_save = step, time.monotonic()
            if stopping:
                trainer.stopped_by = stop.received or "a signal on another process"
                break
        else:
            trainer.stopped_by = None
        if diverged is not None:
            trainer.stopped_by = None
            if pending is not None:  # the window's metrics (NaN, typically), marked
                log_window(trainer.step, nonfinite=True)
            _stop_diverged(trainer, log, diverged)
    if main and log.path.exists():
        plot_metrics(log.path, trainer.out_dir / "metrics.png")
    return last_eval


@contextlib.contextmanager
def _training(stop: StopSignals):
    """The stage in which a first signal stops the run after the current step."""
    stop.stage = "training"
    try:
        yield
    finally:
        stop.stage = "finished"


def _stop_diverged(trainer: Trainer, log: MetricsLog, diverged: tuple[str, int, int | None]) -> None:
    """Record where the run went non-finite, in trainer.diverged and metrics.jsonl. The last good
    checkpoint stays as it is; if there is none, the run's initial state is written, from which
    `trm train --resume` with a lower learning rate starts afresh. Collective under DDP."""
    what, from_step, first = diverged
    to_step, lr = trainer.step, trainer.optimizer.param_groups[0]["lr"]
    initial = trainer.saved_step is None
    if initial:
        trainer.restart()
        path = trainer.save()
    else:
        path = trainer.out_dir / CHECKPOINT
    trainer.diverged = Divergence(what, from_step, to_step, first, path, trainer.saved_step, initial)
    log.write({"split": "nonfinite", "step": to_step, "from_step": from_step, "first_step": first,
               "what": what, "lr": lr, "checkpoint_step": trainer.saved_step})  # fmt: skip
