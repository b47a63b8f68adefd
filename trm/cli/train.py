"""trm train: new runs, resumed runs, one process per run directory."""

from __future__ import annotations

import contextlib
import gc
import os
import shlex
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.markup import escape

from .. import checkpoint, paths
from ..config import RunConfig, TrainConfig, apply_overrides, validate
from ..train import CHECKPOINT, NONFINITE, Divergence, MetricsLog, Trainer, fit, init_distributed
from .common import DEFAULT_PRESET, PresetOpt, SetOpt, app, config_from, console, errors, fail, run_data, warn
from .data import check_batch_fits, check_data, default_data

# train.* fields that change what a run does next, not what it computes: a resume may change them freely
BOOKKEEPING = {"train.steps", "train.eval_interval", "train.eval_steps", "train.eval_batch_size",
               "train.checkpoint_interval", "train.checkpoint_minutes", "train.log_interval",
               "train.eval_halt", "train.eval_halt_threshold", "model.cuda_graphs", "model.compile"}  # fmt: skip


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


def _point_latest(out: Path, preset_name: str) -> None:
    latest = out.parent / f"{preset_name}-latest"
    tmp = out.parent / f".{preset_name}-latest.tmp"
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(out.name, target_is_directory=True)
        os.replace(tmp, latest)
    except OSError:  # no symlinks here (some Windows setups): the dated name still works
        tmp.unlink(missing_ok=True)


@app.command()
def train(
    preset_name: PresetOpt = None,
    overrides: SetOpt = None,
    data: Annotated[Path | None, typer.Option(help="dataset (default: data/<preset>, built if absent)")] = None,
    out: Annotated[Path | None, typer.Option(help="run directory (default: runs/<preset>-<date>-<time>)")] = None,
    resume: Annotated[bool, typer.Option(help="continue the run in --out from its checkpoint")] = False,
    progress: Annotated[bool, typer.Option(help="show progress (a bar on a terminal, lines otherwise)")] = True,
) -> None:
    """Train (and evaluate) a TRM; Ctrl-C stops after the current step with a checkpoint.


    A run whose loss turns NaN or infinite stops (exit status 1) keeping its last good
    checkpoint; --resume with a lower train.lr continues from it. On several GPUs run it
    under torchrun."""
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
    with _run_directory(out, preset_name, resume, rank) as out:
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
            elif out.parent.name == "runs" and out.name.startswith(preset_name + "-"):
                _point_latest(out, preset_name)
            console.print(f"{cfg.model.arch.upper()} {trainer.model.num_parameters():,} parameters on {device}, "
                          f"{world} process(es); run directory {out}")  # fmt: skip
        result = fit(trainer, show_progress=progress, console=console)
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
def _run_directory(out: Path | None, preset_name: str | None, resume: bool, rank: int) -> Iterator[Path]:
    """The run directory, created if new and held by this process (rank 0) for the whole run:
    a second `trm train` on it stops with one line naming this one."""
    if rank != 0:  # rank 0 holds it; the others only need its name
        yield out or Path("runs") / f"{preset_name}-rank{rank}"
        return
    made = None
    if out is None:
        out, made = _new_run_dir(preset_name)
    try:
        with paths.held_directory("--out", out, "one run per directory", created=made) as created:
            if not resume and not created and paths.holds_anything(out):
                what = "a run; pass --resume to continue it" if (out / CHECKPOINT).exists() else "files"
                fail(f"--out {out} already holds {what}; a new run needs a new or empty directory")
            yield out
    except (paths.PathProblem, paths.Busy) as e:
        fail(str(e))


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
