"""Model-level benchmarks: a training step and a full evaluation solve, per provider.

Providers: ``eager`` (the reference ops), ``torch.compile`` and
``torch.compile reduce-overhead`` (both of the reference ops), ``fused`` (the trm_kernels
backend picked automatically), ``fused + CUDA graphs`` (the no-grad recursion replayed) and
``fused + torch.compile`` (our ops inside a compiled step, as ``model.compile`` trains).
Figures: step time, tokens/s (one supervision step of the batch), MFU from an analytic
FLOP count, peak memory. With a trained run, ``adaptive_rows`` compares adaptive against
fixed-step evaluation (puzzles/s, exact accuracy).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import trm_kernels as K

from trm.api import load
from trm.arch import build_model
from trm.config import ModelConfig, preset
from trm.data.store import Split, load_split
from trm.evaluate import evaluate, evaluate_adaptive
from trm.layers import intermediate_size
from trm.losses import act_loss
from trm.model import Carry, RecursiveReasoningModel
from trm.optim import AdamATan2

from .breakdown import profile_step
from .common import Results, Row, bench
from .ops import fused_runs_on

T = TypeVar("T")


def step_flops(cfg: ModelConfig, batch: int, train: bool) -> float:
    """Matrix FLOPs of one supervision step: every net call and the heads forward, the grad
    cycle's and the heads' backward (trm_benchmarks.roofline counts the same from the code)."""
    s, d = cfg.seq_len + cfg.puzzle_emb_len, cfg.hidden_size
    tokens = batch * s
    mlp = 2 * tokens * 3 * d * intermediate_size(d, cfg.expansion)
    if cfg.mlp_t:
        mixer = 2 * batch * d * 3 * s * intermediate_size(s, cfg.expansion)
    else:
        mixer = 2 * tokens * 4 * d * d + 4 * batch * s * s * d
    per_call = cfg.num_layers * (mlp + mixer)
    calls, grad_calls = cfg.T * (cfg.n + 1), cfg.n + 1
    # the output head over every position (the puzzle-embedding ones are computed, then dropped,
    # as the reference does) and the 2-wide halting head on the first
    head = 2 * batch * s * d * cfg.vocab_size + 2 * batch * d * 2
    return per_call * calls + head + (2 * (per_call * grad_calls + head) if train else 0)


def _batch(cfg: ModelConfig, size: int, device: torch.device) -> dict[str, torch.Tensor]:
    shape = (size, cfg.seq_len)
    return {
        "inputs": torch.randint(1, cfg.vocab_size, shape, device=device),
        "labels": torch.randint(1, cfg.vocab_size, shape, device=device),
        "puzzle_identifiers": torch.zeros(size, dtype=torch.long, device=device),
    }


@dataclass(frozen=True)
class Provider:
    name: str
    backend: str  # trm_kernels backend
    compile_kwargs: dict | None = None  # torch.compile arguments, None: not compiled
    graphs: bool = False  # our CUDA graphs of the no-grad recursion


def fused_backend(device: torch.device) -> str:
    """The trm_kernels backend a fused row runs here: ``auto`` on a GPU (the fused kernels
    wherever they take a call); on a CPU ``triton`` in the interpreter (TRITON_INTERPRET=1 set
    before import); else (a CPU without it, or no triton) ``reference``."""
    if "triton" not in K.available("add_rmsnorm") or not fused_runs_on(device):
        return "reference"
    return "auto" if device.type == "cuda" else "triton"


def backend_label(backend: str, device: torch.device) -> str:
    """How a row names the backend it ran: the interpreter said as such."""
    return "triton interpreter" if backend == "triton" and device.type != "cuda" else backend


def _providers(device: torch.device, compile_ok: bool) -> list[Provider]:
    """Eager and ours first, torch.compile (whose compile time is the longest) last. No fused
    rows where they would run the reference (a CPU without the interpreter): eager's rows again."""
    out = [Provider("eager", "reference")]
    fused = fused_backend(device)
    if fused != "reference":
        out.append(Provider("fused", fused))
        if device.type == "cuda":
            out.append(Provider("fused + CUDA graphs", fused, graphs=True))
        if device.type == "cuda" and compile_ok:  # Inductor fuses the glue between our (opaque) ops
            out.append(Provider("fused + torch.compile", fused, {}))
    if compile_ok:
        out += [Provider("torch.compile", "reference", {}),
                Provider("torch.compile reduce-overhead", "reference", {"mode": "reduce-overhead"})]  # fmt: skip
    return out


def _model(cfg: ModelConfig, provider: Provider, device: torch.device, train: bool) -> RecursiveReasoningModel:
    torch.manual_seed(0)
    cfg = dataclasses.replace(cfg, cuda_graphs=provider.graphs)
    return build_model(cfg).to(device).train(train)


def _train_case(name, cfg, batch, device, provider: Provider, gemm_tflops, case=None) -> tuple[Row, Callable]:
    """The row of a timed training step, and the step (warm) for profiling."""
    model = _model(cfg, provider, device, train=True)
    opt = AdamATan2(model.parameters(), lr=1e-4, weight_decay=0.1)
    data = _batch(cfg, batch, device)
    compile_kwargs = provider.compile_kwargs
    forward = torch.compile(model, **compile_kwargs) if compile_kwargs is not None else model
    state = {"carry": model.initial_carry(data)}

    graphed_by_compile = (compile_kwargs or {}).get("mode") == "reduce-overhead"

    def step():
        if graphed_by_compile:  # its graph outputs are overwritten by the next replay
            torch.compiler.cudagraph_mark_step_begin()
        with K.use_backend(provider.backend):
            carry, outputs = forward(state["carry"], data)
            loss, _ = act_loss(outputs, carry)
            (loss / batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if graphed_by_compile:  # what a user of reduce-overhead must do to keep the carry
            carry = Carry(carry.y.clone(), carry.z.clone(), carry.steps.clone(), carry.halted.clone(),
                          {k: v.clone() for k, v in carry.data.items()})  # fmt: skip
        state["carry"] = carry

    for _ in range(3):  # compile, autotune, allocate
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    ms = bench(step, device, reps=20)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    tflops = step_flops(cfg, batch, train=True) / ms / 1e9
    extra = {"batch": batch, "tokens_per_s": batch * cfg.seq_len / ms * 1e3, "mfu": tflops / gemm_tflops,
             "peak_gib": peak, "backend": backend_label(provider.backend, device)}  # fmt: skip
    return Row("training step", case or f"{name} B={batch}", provider.name, ms, tflops=tflops, extra=extra), step


def _fits(row: Row | None) -> bool:
    return row is not None and row.extra.get("peak_gib") is not None


def _largest_batch(name, cfg, device, provider: Provider, gemm_tflops, measured: list[Row], log) -> Row | None:
    """A training step at the largest batch that fits in the GPU's memory.

    Peak memory is linear in the batch (weights and optimizer state, plus activations),
    so it is fitted through two measured steps (those already run, else probes at small
    batches) and solved for 92% of the device's memory; the prediction is run and backed
    off by 15% while it does not fit. The batch is a multiple of 32.
    """
    points = {r.extra["batch"]: r.extra["peak_gib"] for r in measured if _fits(r)}

    def row_at(batch: int, case: str | None = None) -> Row | None:
        measured = _attempt(functools.partial(_train_case, name, cfg, batch, device, provider, gemm_tflops, case), log)
        return measured[0] if measured else None

    for probe in (64, 128):
        if len(points) >= 2:
            break
        if probe not in points:
            row = row_at(probe)
            if not _fits(row):
                return None
            points[probe] = row.extra["peak_gib"]
    (b1, p1), (b2, p2) = sorted(points.items())[-2:]
    per_sample = (p2 - p1) / (b2 - b1)
    budget = 0.92 * torch.cuda.mem_get_info(device)[1] / 2**30
    batch = int((budget - (p2 - per_sample * b2)) / per_sample) // 32 * 32 if per_sample > 0 else b2
    batch = max(batch, b2)  # b2 is known to fit
    for _ in range(4):
        if batch <= 0:
            return None
        row = row_at(batch, case=name)
        if row is not None:
            row.group = "training step (largest batch)"
            return row
        batch = int(batch * 0.85) // 32 * 32
    return None


def _attempt(case: Callable[[], T], log) -> T | None:
    """Run a case; None (and a log line) where it runs out of memory."""
    try:
        return case()
    except torch.OutOfMemoryError as e:
        log(f"out of memory: {str(e).splitlines()[0][:160]}")
        return None
    finally:
        _release()


def _release() -> None:
    """Return what dropped models and graphs held, so the next case's peak is its own."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _eval_case(name, cfg, batch, device, provider: Provider) -> Row:
    model = _model(cfg, provider, device, train=False)
    data = _batch(cfg, batch, device)
    compile_kwargs = provider.compile_kwargs
    solve_step = torch.compile(model.deep_recursion, **compile_kwargs) if compile_kwargs is not None else None

    @torch.no_grad()
    def solve():
        with K.use_backend(provider.backend):
            if solve_step is None:
                for _ in model.solve(data):
                    pass
                return
            x = model.embed(data["inputs"], data["puzzle_identifiers"])
            y, z = model.initial_y_z(batch)
            for _ in range(cfg.n_sup):
                y, z, _, _ = solve_step(x, y, z)
                y, z = y.clone(), z.clone()  # graph outputs are overwritten by the next replay

    solve()
    ms = bench(solve, device, reps=10)
    return Row("evaluation (full solve)", f"{name} B={batch}", provider.name, ms,
               extra={"batch": batch, "puzzles_per_s": batch / ms * 1e3,
                      "backend": backend_label(provider.backend, device)})  # fmt: skip


NAMES = ("sudoku-mlp", "sudoku-att", "maze", "hrm-sudoku")  # HRM: the baseline, same ops


def configs(quick: bool, names: list[str] | None = None) -> list[tuple[str, ModelConfig, list[int], list[int]]]:
    """(name, config, training batches, evaluation batches), of `names` (default: all)."""
    unknown = set(names or ()) - set(NAMES)
    if unknown:
        raise ValueError(f"unknown benchmark configs {sorted(unknown)}; choose from {', '.join(NAMES)}")
    dtype = "auto"
    if quick:
        tiny = dict(hidden_size=64, num_heads=2, T=2, n=1, n_sup=2, puzzle_emb_len=1, forward_dtype=dtype)
        return [("sudoku4-mlp", ModelConfig(vocab_size=6, seq_len=16, mlp_t=True, **tiny), [4], [1, 4]),
                ("sudoku4-att", ModelConfig(vocab_size=6, seq_len=16, mlp_t=False, **tiny), [4], [1])]  # fmt: skip
    out = []
    for name in names or NAMES:
        cfg = preset(name).model
        cfg.forward_dtype = dtype
        # 768 at S = 916 may not fit one GPU (the reference splits it over 4 GPUs, 192 each)
        out.append((name, cfg, [768] if name != "maze" else [768, 192], [1, 768]))
    return out


PROFILED = ("eager", "fused + CUDA graphs", "fused")  # providers whose training step is profiled
SEARCHED = ("eager", "fused + CUDA graphs")  # providers whose largest batch is searched (no recompiles)


def run(results: Results, device: torch.device, quick: bool, compile_ok: bool, names: list[str] | None = None,
        profile: bool = False, save: Callable[[], None] = lambda: None) -> None:  # fmt: skip
    """Append every model-level row (and skip, and profile) to `results`, calling save() after each provider."""
    gemm = results.ceilings["gemm_tflops"]

    def log(row_or_text) -> None:
        if isinstance(row_or_text, Row):
            r = row_or_text
            row_or_text = f"{r.group:30s} {r.case:24s} {r.provider:30s} {r.ms:10.3f} ms {r.extra}"
        print(row_or_text, flush=True)

    def skip(group: str, case: str, provider: Provider) -> None:
        results.skipped.append({"group": group, "case": case, "provider": provider.name, "reason": "out of memory"})

    for name, cfg, train_batches, eval_batches in configs(quick, names):
        for provider in _providers(device, compile_ok):
            trained: list[Row] = []
            for batch in train_batches:
                measured = _attempt(functools.partial(_train_case, name, cfg, batch, device, provider, gemm), log)
                if measured is None:
                    skip("training step", f"{name} B={batch}", provider)
                    continue
                row, step = measured
                log(row)
                trained.append(row)
                if profile and provider.name in PROFILED and len(trained) == 1:
                    entry = profile_step(step, device, row.ms)
                    results.profiles.append({"case": row.case, "provider": provider.name, **entry})
                del measured, step  # the model, its optimizer state and graphs: freed before the next case
                _release()
            rows = trained  # then the largest batch and the evaluation rows
            if device.type == "cuda" and provider.name in SEARCHED:
                largest = _largest_batch(name, cfg, device, provider, gemm, trained, log)
                if largest is None:
                    skip("training step (largest batch)", name, provider)
                else:
                    log(largest)
                    rows.append(largest)
            for batch in eval_batches:
                row = _attempt(functools.partial(_eval_case, name, cfg, batch, device, provider), log)
                if row is None:
                    skip("evaluation (full solve)", f"{name} B={batch}", provider)
                else:
                    log(row)
                    rows.append(row)
            results.rows += rows
            save()


def adaptive_rows(run: Path, device: torch.device, batches=(768, 1), puzzles: int = 2048) -> list[Row]:
    """Adaptive against fixed-step evaluation of a trained run, on the first `puzzles` of its
    test split: puzzles/s and exact accuracy of each, per batch, eager and (on a GPU) fused +
    CUDA graphs. Halting means nothing with random weights, so this needs a trained run
    (`trm train --preset sudoku4` takes a few minutes on a CPU, less on a GPU)."""
    solver = load(run, device=device)
    model, meta = solver.model, solver.meta
    full = load_split(Path(meta["data_dir"]), "test")
    count = min(puzzles, len(full))
    if count == 0:
        raise ValueError(f"{run}: the run's dataset has no test puzzles")
    split = Split(full.inputs[:count], full.labels[:count], full.puzzle_identifiers[:count])
    name, n_sup = Path(run).name, model.cfg.n_sup
    providers = [Provider("eager", "reference")]
    if device.type == "cuda" and "triton" in K.available("add_rmsnorm"):
        providers.append(Provider("fused + CUDA graphs", "auto", graphs=True))
    rows = []
    for provider in providers:
        model.cfg = dataclasses.replace(model.cfg, cuda_graphs=provider.graphs)
        with K.use_backend(provider.backend):
            for batch in batches:
                batch = min(batch, count)
                warm = Split(split.inputs[:batch], split.labels[:batch], split.puzzle_identifiers[:batch])
                evaluate_adaptive(model, warm, batch)  # compile, capture, parity checks
                evaluate(model, warm, batch)
                halting = evaluate_adaptive(model, split, batch)
                _sync(device)
                started = time.perf_counter()
                fixed = evaluate(model, split, batch)
                _sync(device)
                fixed_s = time.perf_counter() - started
                case = f"{name} B={batch}"
                for mode, per_s, exact, steps in (
                    ("halting", halting["puzzles_per_second"], halting["exact_accuracy"], halting["steps_mean"]),
                    (f"fixed {n_sup} steps", count / fixed_s, fixed["exact_accuracy"], n_sup),
                ):
                    row = Row("adaptive evaluation", case, f"{provider.name}, {mode}", 1e3 / per_s,
                              extra={"batch": batch, "puzzles": count, "puzzles_per_s": per_s,
                                     "exact_accuracy": exact, "steps_mean": steps})  # fmt: skip
                    print(f"{row.case:24s} {row.provider:34s} {per_s:10.1f} puzzles/s  exact {exact:.4f}", flush=True)
                    rows.append(row)
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
