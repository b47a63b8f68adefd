"""trm train: new runs, resumed runs, one process per run directory."""

from __future__ import annotations

import contextlib
import gc
import os
import shlex
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.markup import escape

from .. import checkpoint, paths
from ..config import RunConfig, TrainConfig, apply_overrides, validate
from ..train import CHECKPOINT, NONFINITE, Divergence, MetricsLog, StopSignals, Trainer, fit, init_distributed
from .common import DEFAULT_PRESET, PresetOpt, SetOpt, app, config_from, console, errors, fail, run_data, warn
from .data import check_batch_fits, check_data, default_data

# train.* fields that change what a run does next, not what it computes: a resume may change them freely
BOOKKEEPING = {"train.steps", "train.eval_interval", "train.eval_steps", "train.eval_batch_size",
               "train.checkpoint_interval", "train.checkpoint_minutes", "train.log_interval",
               "train.eval_halt", "train.eval_halt_threshold", "model.cuda_graphs", "model.compile"}  # fmt: skip

DATA_HELP = (
    "dataset (default: data/<preset>, or data/<task><size>-<digest> with other data.* settings; built if absent)"
)


def _new_run_dir(preset_name: str) -> tuple[Path, Path]:
    """runs/<preset>-<date>-<time>, a name no other run has (two runs started in the same
    second get -2, -3, ...), created here so that the name is this run's; and the top-most
    directory made for it (runs/ itself on a first run)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{preset_name}-{stamp}"
    try:
        paths.check_dir("--out", base)
    except paths.PathProblem as e:
        fail(f"{e} (the default run directory; pass --out)")
    top = base if base.parent.exists() else base.parent
    for suffix in range(1, 1000):
        out = base if suffix == 1 else base.with_name(f"{base.name}-{suffix}")
        try:
            out.mkdir(parents=True)
            return out, (out if top == base else top)
        except FileExistsError:
            continue
    fail(f"{base}: too many runs started in one second")


def _latest_link(out: Path, preset_name: str) -> Path | None:
    """runs/<preset>-latest, for a run directory named runs/<preset>-..."""
    if out.parent.name == "runs" and out.name.startswith(preset_name + "-"):
        return out.parent / f"{preset_name}-latest"
    return None


def _point_latest(latest: Path, target: str | None) -> None:
    """Point the symlink `latest` at `target`, a name next to it (None: remove the link)."""
    tmp = latest.with_name(f".{latest.name}.tmp")
    try:
        tmp.unlink(missing_ok=True)
        if target is None:
            latest.unlink(missing_ok=True)
        else:
            tmp.symlink_to(target, target_is_directory=True)
            os.replace(tmp, latest)
    except OSError:  # no symlinks here (some Windows setups): the dated name still works
        tmp.unlink(missing_ok=True)


def _link_target(link: Path | None) -> str | None:
    """What the symlink `link` points at (None: no such link)."""
    try:
        return os.readlink(link) if link is not None else None
    except OSError:
        return None


@app.command()
def train(
    preset_name: PresetOpt = None,
    overrides: SetOpt = None,
    data: Annotated[Path | None, typer.Option(help=DATA_HELP)] = None,
    out: Annotated[Path | None, typer.Option(help="run directory (default: runs/<preset>-<date>-<time>)")] = None,
    resume: Annotated[bool, typer.Option(help="continue the run in --out from its checkpoint")] = False,
    progress: Annotated[bool, typer.Option(help="show progress (a bar on a terminal, lines otherwise)")] = True,
) -> None:
    """Train (and evaluate) a TRM; Ctrl-C stops after the current step with a checkpoint.


    Ctrl-C again (or once before training starts) stops at once: the run directory is kept if
    it holds a checkpoint (--resume continues it), and removed if not. A run whose loss turns
    NaN or infinite stops (exit status 1) keeping its last good
    checkpoint; --resume with a lower train.lr continues from it. On several GPUs run it
    under torchrun."""
    with StopSignals() as signals, _exit_when_aborted(signals):
        _train(preset_name, overrides, data, out, resume, progress, signals)


@contextlib.contextmanager
def _exit_when_aborted(signals: StopSignals) -> Iterator[None]:
    """A command stopped at once by a signal exits 130 (SIGINT) or 143 (SIGTERM), without a
    traceback: each signal's line is printed, and what the run directory keeps, by _run_directory."""
    try:
        yield
    except KeyboardInterrupt:
        raise typer.Exit(143 if signals.received == "SIGTERM" else 130) from None


def _train(preset_name: str | None, overrides: list[str] | None, data: Path | None, out: Path | None, resume: bool,
           progress: bool, signals: StopSignals) -> None:  # fmt: skip
    """The body of `trm train`, under the signals it holds from its start."""
    if resume:
        if out is None:
            fail("--resume needs --out, the run directory to continue")
        if preset_name is not None:
            fail("--preset cannot be combined with --resume: a run continues with its own configuration "
                  "(change train.* settings with --set)")  # fmt: skip
        cfg, data, meta = _resume_config(out, overrides, data)
        implicit = False
    else:
        cfg = config_from(preset_name, overrides)
        preset_name = preset_name or DEFAULT_PRESET
        implicit = data is None
        data = data or default_data(cfg, preset_name)
        if not implicit:
            check_data(cfg, data, implicit=False)
        elif not (data / "metadata.json").exists():
            check_batch_fits(cfg)
    rank, world, device = init_distributed()
    if device.type == "cpu" and cfg.train.global_batch_size * cfg.model.hidden_size >= 256 * 512 and rank == 0:
        warn(f"this configuration is sized for a GPU (batch {cfg.train.global_batch_size}, hidden "
             f"{cfg.model.hidden_size}): on a CPU a step can take minutes and more memory than a laptop has; "
             "the CPU presets are sudoku4 and maze7")  # fmt: skip
    with _run_directory(out, preset_name, resume, rank, signals) as out:
        if not resume:
            _check_data_everywhere(cfg, data, implicit)
        if world > 1:  # rank 0 has checked (or built) the data
            torch.distributed.barrier()
        try:
            trainer = Trainer(cfg, data, out, device, rank, world)
            if resume:
                trainer.load(out / CHECKPOINT)
        except (ValueError, checkpoint.CheckpointError) as e:
            fail(str(e))
        if rank == 0:
            if resume:
                dropped = MetricsLog(out / "metrics.jsonl", True).truncate_after(trainer.step)
                note = f"; dropped {dropped} metric record(s) logged after it" if dropped else ""
                console.print(f"resuming {out} at step {trainer.step} of {cfg.train.steps}{note}")
            console.print(f"{cfg.model.arch.upper()} {trainer.model.num_parameters():,} parameters on {device}, "
                          f"{world} process(es); run directory {out}")  # fmt: skip
        result = fit(trainer, show_progress=progress, console=console, signals=signals)
        stopped_by, step, diverged = trainer.stopped_by, trainer.step, trainer.diverged
        if world > 1:  # every process finishes (rank 0 writes the last checkpoint) before teardown
            torch.distributed.barrier()
            del trainer  # DDP's reducer goes before its process group, not at interpreter exit
            gc.collect()
            torch.distributed.destroy_process_group()
    if rank != 0:  # rank 0 alone reports, and exits non-zero (torchrun then reports its status)
        return
    if diverged is not None:
        errors.print(f"[red]error:[/red] {escape(_diverged_message(diverged, out, cfg.train.lr))}",
                     markup=True, highlight=False)  # fmt: skip
        raise typer.Exit(1)
    if stopped_by is not None:
        console.print(f"stopped by {stopped_by} at step {step} of {cfg.train.steps}; checkpoint written. "
                      f"Continue with: trm train --resume --out {shlex.quote(str(out))}")  # fmt: skip
        raise typer.Exit(130 if stopped_by == "SIGINT" else 143)
    if not result:
        console.print(f"[bold green]done[/]: no test puzzles, nothing evaluated; metrics in {out / 'metrics.jsonl'}")
        return
    console.print(
        f"[bold green]test exact accuracy {result['exact_accuracy']:.4f}[/] "
        f"(token accuracy {result['accuracy']:.4f}, {int(result['count'])} held-out puzzles); "
        f"metrics in {out / 'metrics.jsonl'}, plot {out / 'metrics.png'}"
    )


def _diverged_message(d: Divergence, out: Path, lr: float) -> str:
    """One line: where the run went non-finite, the checkpoint it kept, how to continue."""
    if d.from_step < d.to_step:
        where = f"between steps {d.from_step} and {d.to_step}"
        where += f" (first at step {d.first_step})" if d.first_step is not None else ""
    else:
        where = f"at step {d.to_step}"
    if d.initial:
        kept = f"no checkpoint had been written, so {d.checkpoint} now holds the run's initial state (step 0)"
    else:
        kept = f"the last good checkpoint, {d.checkpoint} (step {d.checkpoint_step}), is kept"
    lower = min(lr / 10, TrainConfig.lr)  # a tenth, and at most the paper's learning rate
    resume = f"trm train --resume --out {shlex.quote(str(out))} --set train.lr={lower:g}"
    what = NONFINITE[d.what]
    return f"{what} became non-finite {where} with train.lr={lr:g}; {kept}. Continue with a lower one: {resume}"


@contextlib.contextmanager
def _run_directory(
    out: Path | None, preset_name: str | None, resume: bool, rank: int, signals: StopSignals
) -> Iterator[Path]:
    """The run directory, created if new and held by this process (rank 0) for the whole run:
    a second `trm train` on it stops with one line naming this one.

    A run that fails or is aborted (Ctrl-C twice, or once before training) keeps its directory
    only if it holds a checkpoint, which --resume continues. Without one, nothing it wrote is
    worth keeping (a run continued from a checkpoint logs the steps after it again): the
    directory is removed if this command made it, emptied if it was an empty one given with
    --out, and runs/<preset>-latest points back where it did. The directory is then always
    resumable or gone, and the same command can simply be run again."""
    if rank != 0:  # rank 0 holds it; the others only need its name
        yield out or Path("runs") / f"{preset_name}-rank{rank}"
        return
    try:
        with _say_what_is_kept(lambda: out), contextlib.ExitStack() as held:
            with signals.deferred():  # made and held, or neither, whenever a signal comes
                made = None
                if out is None:
                    out, made = _new_run_dir(preset_name)
                created = held.enter_context(paths.held_directory("--out", out, "one run per directory", created=made))
            if not resume and not created and paths.holds_anything(out):
                what = "a run; pass --resume to continue it" if (out / CHECKPOINT).exists() else "files"
                fail(f"--out {out} already holds {what}; a new run needs a new or empty directory")
            latest = None if resume else _latest_link(out, preset_name)
            previous = _link_target(latest)
            try:
                if latest is not None:
                    _point_latest(latest, out.name)
                yield out
            except BaseException:
                if not (out / CHECKPOINT).exists():
                    paths.empty(out)  # held_directory then removes it if it made it
                    if latest is not None and _link_target(latest) == out.name:  # no later run took it meanwhile
                        _point_latest(latest, previous)
                raise
    except (paths.PathProblem, paths.Busy) as e:
        fail(str(e))


@contextlib.contextmanager
def _say_what_is_kept(out: Callable[[], Path | None]) -> Iterator[None]:
    """After an abort (KeyboardInterrupt) and the cleanup inside this block: one line saying
    what the run directory `out()` keeps."""
    try:
        yield
    except KeyboardInterrupt:
        errors.print(_aborted_message(out()), markup=False, highlight=False)
        raise


def _aborted_message(out: Path | None) -> str:
    if out is None:
        return "aborted: no run directory had been made"
    if (out / CHECKPOINT).exists():
        return (
            f"aborted: {out} keeps its last checkpoint; continue with: trm train --resume --out {shlex.quote(str(out))}"
        )
    kept = "emptied again" if out.exists() else "removed"
    return f"aborted: no checkpoint had been written, so the run directory {out} is {kept}"


def _check_data_everywhere(cfg: RunConfig, data: Path, implicit: bool) -> None:
    """Rank 0 checks (and at the default location builds) the data; the others wait for it."""
    if int(os.environ.get("RANK", "0")) == 0:
        check_data(cfg, data, implicit)


def _resume_config(out: Path, overrides: list[str] | None, data: Path | None) -> tuple[RunConfig, Path, dict]:
    """The run's own config with --set changes (train.* only), checked; exits if the run is finished."""
    try:
        _, meta = checkpoint.load(out / CHECKPOINT)
    except checkpoint.CheckpointError as e:
        fail(f"{e}; --resume continues a run that has written a checkpoint")
    cfg = RunConfig.from_dict(meta["config"])
    before = cfg.to_dict()
    try:
        validate(apply_overrides(cfg, overrides or []))
    except ValueError as e:
        fail(str(e))
    after = cfg.to_dict()
    for section in after:
        for name, new in after[section].items():
            key, old = f"{section}.{name}", before[section][name]
            if new == old or key in BOOKKEEPING:
                continue
            if section != "train" and key != "model.forward_dtype":
                fail(f"{key} cannot change on --resume (the run was trained with {old!r}); start a new run instead")
            warn(f"{key} changed from {old!r} to {new!r}: the resumed run is no longer an exact continuation"
                  + (" (the ACT carry restarts)" if key == "train.global_batch_size" else ""))  # fmt: skip
    if meta["step"] >= cfg.train.steps:
        console.print(f"{out} is finished (step {meta['step']} of {cfg.train.steps}); to train further: "
                      f"trm train --resume --out {shlex.quote(str(out))} --set train.steps=N")  # fmt: skip
        raise typer.Exit(0)
    return cfg, run_data(meta, data), meta
