"""The first look at a GPU, planned for 7 minutes on one H100/H200 from a fresh checkout
(Triton compilation included): is the package correct here, which kernels chose themselves,
how far is a training step from its floor, and is each op ahead of what a user would
otherwise pick?

    python -m trm_benchmarks.first --out OUT      # what `bash benchmarks/gpu.sh OUT first` runs

Sections, each with its own time budget (seconds); a section past its budget stops between
cases and lists what it skipped, and each writes its file as soon as it ends (``summary.md``,
which a person reads first, is rewritten after every section), so a run stopped early keeps
what it measured:

- environment (10 s; environment.json): GPU, clocks, driver, versions, the peers installed.
- ceilings (40 s; ceilings.json): a device-to-device copy, an 8192^3 bf16 GEMM, and sudoku's
  GEMM shapes through cuBLAS.
- doctor (120 s; doctor/doctor.json, doctor/doctor.md): ``trm doctor --quick``, the parity of
  every op and dtype and the timed choices.
- ops (110 s; ops.json): RMSNorm, SwiGLU, cross-entropy and attention at TRM's shapes by
  eager PyTorch, torch.compile (and max-autotune), Liger-Kernel, QuACK, SDPA's backends and
  ours, in GB/s or TFLOP/s with the ratio to the best peer (``trm_benchmarks.peer_ops``).
- model (140 s; model.json): sudoku-mlp's and sudoku-att's training steps at batch 768 (eager,
  torch.compile, fused + CUDA graphs) against the speed-of-light prediction from this run's
  ceilings (``trm_benchmarks.roofline``).

Without a CUDA device every section but the environment says "skipped: no CUDA device".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

SECTIONS = {"environment": 10, "ceilings": 40, "doctor": 120, "ops": 110, "model": 140}  # budgets, seconds
FILES = ("summary.md", "environment.json", "ceilings.json", "doctor/doctor.json", "doctor/doctor.md", "ops.json",
         "model.json")  # fmt: skip
OURS = ("trm triton", "trm cuda")  # the providers that are ours; every other one is a peer


@dataclasses.dataclass
class Budget:
    """A section's time budget, on a clock a test can stand in for."""

    seconds: float
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self):
        self.started = self.clock()

    def used(self) -> float:
        return self.clock() - self.started

    def left(self) -> float:
        return self.seconds - self.used()


@dataclasses.dataclass
class Context:
    out: Path
    device: torch.device
    clock: Callable[[], float] = time.monotonic
    results: dict = dataclasses.field(default_factory=dict)  # section -> its result


# ---- sections -------------------------------------------------------------------------------


def environment(ctx: Context, budget: Budget) -> dict:
    from . import peers

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "peers": peers.status()}  # fmt: skip
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        info |= {"gpu": props.name, "capability": f"{props.major}.{props.minor}", "sms": props.multi_processor_count,
                 "memory_gib": round(props.total_memory / 2**30, 1),
                 "shared_per_block_optin": props.shared_memory_per_block_optin}  # fmt: skip
    if shutil.which("nvidia-smi"):
        query = "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu"
        done = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=max(1.0, budget.left()))  # fmt: skip
        info["nvidia_smi"] = dict(zip(query.split(","), done.stdout.strip().split(", "), strict=False))
    return info


def ceilings(ctx: Context, budget: Budget) -> dict:
    """Measured in this run: what the predictions and the GB/s and TFLOP/s columns divide by."""
    from .common import bench, copy_ceiling, gemm_ceiling
    from .roofline import mlp_shapes

    out = {"copy_gbps": copy_ceiling(ctx.device, 2**31), "gemm_8192_tflops": gemm_ceiling(ctx.device, 8192)}
    tokens, hidden, inter = mlp_shapes("sudoku-mlp", 768)
    shapes = {"gate_up": (tokens, hidden, 2 * inter), "down": (tokens, inter, hidden),
              "qkv (sudoku-att)": (tokens, hidden, 3 * hidden),
              "o_proj (sudoku-att)": (tokens, hidden, hidden)}  # fmt: skip
    out["sudoku_gemms"], skipped = {}, []
    for name, (m, k, n) in shapes.items():
        if budget.left() <= 0:
            skipped.append(name)
            continue
        a = torch.randn(m, k, device=ctx.device, dtype=torch.bfloat16)
        b = torch.randn(k, n, device=ctx.device, dtype=torch.bfloat16)
        ms = bench(lambda a=a, b=b: a @ b, ctx.device)
        out["sudoku_gemms"][name] = {"m": m, "k": k, "n": n, "ms": ms, "tflops": 2 * m * k * n / ms / 1e9}
    return out | ({"skipped": skipped} if skipped else {})


def doctor(ctx: Context, budget: Budget) -> dict:
    target = ctx.out / "doctor"
    args = [sys.executable, "-m", "trm.doctor", "--quick", "--out", str(target)]
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=max(1.0, budget.left()))
    except subprocess.TimeoutExpired:
        return {"skipped": [f"stopped at its budget of {budget.seconds:g} s: no report written"]}
    report = json.loads((target / "doctor.json").read_text()) if (target / "doctor.json").exists() else {}
    checks = report.get("checks", [])
    failed = [f"{c['kind']} {c['name']} {c['backend']} {c['dtype']} {c['shape']}: {c['detail']}"
              for c in checks if c.get("passed") is False]  # fmt: skip
    choices = [f"{c['name']} {c['shape']}: {c['detail']}" for c in checks if c["kind"] == "choice"]
    return {"exit_code": done.returncode, "checks": len(checks), "failed": failed, "choices": choices}


def ops(ctx: Context, budget: Budget) -> dict:
    from . import peer_ops

    rows, skipped = peer_ops.run(ctx.device, budget, quick=ctx.device.type != "cuda")
    return {"rows": rows, "skipped": skipped}


def model(ctx: Context, budget: Budget) -> dict:
    """Each config's training step by each provider at batch 768, and the prediction for this GPU
    from this run's ceilings (the speed-of-light model of trm_benchmarks.roofline)."""
    from . import model as bench_model
    from . import roofline

    ceil = ctx.results.get("ceilings", {})
    gemm = ceil.get("gemm_8192_tflops") or 1.0
    gpu = None
    if ceil.get("copy_gbps"):
        gpu = roofline.GPU("this GPU, ceilings measured in this run", ceil["copy_gbps"] * 1e9, gemm * 1e12,
                           "trm_benchmarks.first's ceilings section")  # fmt: skip
    providers = [bench_model.Provider("eager", "reference"), bench_model.Provider("torch.compile", "reference", {}),
                 bench_model.Provider("fused + CUDA graphs", "auto", graphs=True)]  # fmt: skip
    rows, skipped = [], []
    for name in ("sudoku-mlp", "sudoku-att"):
        cfg = roofline.preset(name).model
        cfg.forward_dtype = "auto"
        for provider in providers:
            if budget.left() <= 0:
                skipped.append(f"{name} {provider.name}")
                continue
            try:
                row, _ = bench_model._train_case(name, cfg, 768, ctx.device, provider, gemm)
            except Exception as e:  # out of memory, a compile failure: the next provider still runs
                skipped.append(f"{name} {provider.name}: raised {type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
                continue
            entry = {"config": name, "provider": provider.name, "batch": 768, "ms": row.ms, **row.extra}
            if gpu is not None and provider.name in roofline.PROVIDERS:
                predicted = roofline.predict(roofline.count_step(name, provider.name, "train", 768), provider.name,
                                             gpu)["us"] / 1e3  # fmt: skip
                entry |= {"predicted_ms": predicted, "measured_over_predicted": row.ms / predicted}
            rows.append(entry)
    return {"rows": rows, "skipped": skipped}


RUNS: dict[str, Callable[[Context, Budget], dict]] = {
    "environment": environment, "ceilings": ceilings, "doctor": doctor, "ops": ops, "model": model}  # fmt: skip


def run_section(ctx: Context, name: str, seconds: float) -> dict:
    """One section under its budget: its result with status and seconds, never an exception."""
    budget = Budget(seconds, ctx.clock)
    if ctx.device.type != "cuda" and name != "environment":
        return {"status": "skipped: no CUDA device", "budget_s": seconds, "seconds": 0.0}
    try:
        result = RUNS[name](ctx, budget)
        status = "ok" if not result.get("skipped") else f"over its budget: skipped {len(result['skipped'])}"
    except Exception as e:  # one section failing must not cost the others
        result, status = {}, f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
    return {"status": status, "budget_s": seconds, "seconds": round(budget.used(), 2), **result}


def _write(ctx: Context, name: str) -> None:
    if name != "doctor":  # (trm doctor writes its own two files)
        (ctx.out / f"{name}.json").write_text(json.dumps(ctx.results[name], indent=1, default=str) + "\n")
    (ctx.out / "summary.md").write_text(summary(ctx.results, ctx.device))


def summary(results: dict, device: torch.device) -> str:
    """What a person reads first: each section's status, and the tables."""
    env = results.get("environment", {})
    lines = ["# First look at this GPU", "",
             f"{env.get('gpu', 'no CUDA device')} (compute capability {env.get('capability', '-')}); torch "
             f"{env.get('torch')}, CUDA {env.get('cuda')}, triton {env.get('triton')}, Python {env.get('python')}; "
             f"peers: {', '.join(f'{k} {v}' for k, v in env.get('peers', {}).items())}.", "",
             "| section | status | seconds (budget) |", "|---|---|---:|"]  # fmt: skip
    for name, seconds in SECTIONS.items():
        r = results.get(name)
        lines.append(f"| {name} | {r['status'] if r else 'not run'} | "
                     + (f"{r['seconds']:g} ({seconds})" if r else f"- ({seconds})") + " |")  # fmt: skip
    ceil = results.get("ceilings", {})
    if ceil.get("copy_gbps"):
        gemms = ", ".join(f"{k} {v['tflops']:.0f}" for k, v in ceil.get("sudoku_gemms", {}).items())
        lines += ["", f"Ceilings: copy {ceil['copy_gbps']:.0f} GB/s, 8192^3 bf16 GEMM {ceil['gemm_8192_tflops']:.0f} "
                  f"TFLOP/s; sudoku's GEMMs: {gemms} TFLOP/s."]  # fmt: skip
    doc = results.get("doctor", {})
    if "checks" in doc:
        lines += ["", f"Doctor: {doc['checks']} checks, {len(doc['failed'])} failed (exit code {doc['exit_code']})."]
        lines += [f"- failed: {f}" for f in doc["failed"]] + [f"- chose: {c}" for c in doc["choices"]]
    rows = results.get("ops", {}).get("rows", [])
    if rows:
        lines += [
            "",
            "| op | case | provider | ms | GB/s or TFLOP/s | best peer / this |",
            "|---|---|---|---:|---:|---:|",
        ]
        for r in rows:
            rate = f"{r['gbps']:.0f} GB/s" if r.get("gbps") else f"{r['tflops']:.1f} TFLOP/s" if r.get("tflops") else ""
            ratio = f"{r['vs_best_peer']:.2f}x" if r.get("vs_best_peer") else ""
            lines.append(f"| {r['op']} | {r['case']} | {r['provider']} | {r['ms']:.4f} | {rate} | {ratio} |")
    steps = results.get("model", {}).get("rows", [])
    if steps:
        lines += ["", "| config | provider | ms per training step | predicted ms | measured / predicted |",
                  "|---|---|---:|---:|---:|"]  # fmt: skip
        for r in steps:
            pred = f"{r['predicted_ms']:.1f} | {r['measured_over_predicted']:.2f}x" if "predicted_ms" in r else "- | -"
            lines.append(f"| {r['config']} | {r['provider']} | {r['ms']:.1f} | {pred} |")
    lines += ["", "Files: " + ", ".join(f"`{f}`" for f in FILES) + " (each section's, once it has run)."]
    skipped = [(name, s) for name, r in results.items() for s in r.get("skipped", []) if isinstance(s, str)]
    if skipped:
        lines += ["", "Skipped (over a section's budget, or raised):"] + [f"- {name}: {s}" for name, s in skipped]
    return "\n".join(lines) + "\n"


def run(out: Path, device: torch.device | None = None, clock: Callable[[], float] = time.monotonic,
        sections: dict[str, float] = SECTIONS) -> dict:  # fmt: skip
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ctx = Context(out, device, clock)
    out.mkdir(parents=True, exist_ok=True)
    for name, seconds in sections.items():
        print(f"{name} (budget {seconds:g} s) ...", flush=True)
        ctx.results[name] = run_section(ctx, name, seconds)
        _write(ctx, name)
        print(f"{name}: {ctx.results[name]['status']} in {ctx.results[name]['seconds']:g} s", flush=True)
    return ctx.results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the result files (created)")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out}: not a directory")
    run(args.out)
    print((args.out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
