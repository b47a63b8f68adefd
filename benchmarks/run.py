"""Run the benchmarks on the machine at hand and write results.{json,md,png} and ceiling.png under --out.

python -m trm_benchmarks.run --out benchmarks/results/h100-2026-11-23            # full, on a GPU
python -m trm_benchmarks.run --out /tmp/bench --quick                            # small shapes, any machine
python -m trm_benchmarks.run --out /tmp/m --only model --configs maze --profile   # one model config, profiled
python -m trm_benchmarks.run --out DIR --merge PART1 PART2                       # one table from several runs
python -m trm_benchmarks.run --out DIR --only lm                                 # the recurrent-depth LM example

On a CPU the fused rows run in the Triton interpreter where TRITON_INTERPRET=1 was set before
the run (slow: a check, not a speed), else on the reference backend (the model part then has no
fused rows, which would be eager's again); each row records the backend it ran (extra.backend
in results.json, and on its line of output).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from . import model, ops, recurrent_depth
from .common import Results, copy_ceiling, environment, gemm_ceiling, merge, read_results
from .report import write_results


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory for the result files")
    parser.add_argument("--quick", action="store_true", help="small shapes (CPU smoke run)")
    parser.add_argument("--only", choices=("ops", "mlp", "model", "lm", "adaptive"),
                        help="run one part (mlp: the SwiGLU MLP's rows of the op table, every provider)")  # fmt: skip
    parser.add_argument(
        "--adaptive-run",
        type=Path,
        metavar="RUN",
        help="a trained run: adds adaptive against fixed-step evaluation rows (puzzles/s, accuracy)",
    )
    parser.add_argument("--adaptive-puzzles", type=int, default=2048, help="test puzzles for those rows (%(default)s)")
    parser.add_argument("--configs", help=f"model configs, comma-separated (default: {','.join(model.NAMES)})")
    parser.add_argument("--profile", action="store_true", help="profile a training step per config: where time goes")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile providers")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="DIR", help="merge these runs' results; run nothing")
    args = parser.parse_args(argv)

    if args.merge:
        try:
            results = merge([read_results(p) for p in args.merge])
        except ValueError as e:
            parser.error(str(e))
        write_results(args.out, results)
        print((args.out / "results.md").read_text())
        return args.out
    if args.only == "adaptive" and args.adaptive_run is None:
        parser.error("--only adaptive needs --adaptive-run RUN (a trained run directory)")
    if args.adaptive_run is not None and not (args.adaptive_run / "checkpoint.safetensors").exists():
        parser.error(f"--adaptive-run {args.adaptive_run}: no checkpoint.safetensors there")
    if args.adaptive_puzzles < 1:
        parser.error(f"--adaptive-puzzles {args.adaptive_puzzles}: at least 1")
    names = [n.strip() for n in args.configs.split(",") if n.strip()] if args.configs else None
    try:
        model.configs(False, names)
    except ValueError as e:
        parser.error(str(e))

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or device.type != "cuda"
    env = environment(device)
    print(f"benchmarking on {env['device']} (torch {env['torch']}, triton {env['triton']})", flush=True)
    ceilings = {
        "copy_gbps": copy_ceiling(device, 2**26 if quick else 2**31),
        "gemm_tflops": gemm_ceiling(device, 512 if quick else 8192),
    }
    print(f"ceilings: copy {ceilings['copy_gbps']:.0f} GB/s, GEMM {ceilings['gemm_tflops']:.1f} TFLOP/s", flush=True)
    results = Results(env, ceilings)
    compile_ok = not args.no_compile
    # results are rewritten as they come, so a run stopped by a time limit keeps what it measured
    if args.only in (None, "ops"):
        results.rows += ops.run(device, quick, compile_ok)
        write_results(args.out, results)
    if args.only == "mlp":  # (part of "ops")
        results.rows += ops.channel_mlp(device, quick, compile_ok)
        write_results(args.out, results)
    if args.only in (None, "model"):
        model.run(results, device, quick, compile_ok, names, args.profile, lambda: write_results(args.out, results))
    if args.only in (None, "lm"):  # another recursive model on trm_kernels.nn
        results.rows += recurrent_depth.rows(device, quick, compile_ok, ceilings["gemm_tflops"])
        write_results(args.out, results)
    if args.adaptive_run is not None and args.only in (None, "adaptive"):
        batches = (768, 1) if device.type == "cuda" else (64, 1)
        results.rows += model.adaptive_rows(args.adaptive_run, device, batches, args.adaptive_puzzles)
        write_results(args.out, results)
    print((args.out / "results.md").read_text())
    return args.out


if __name__ == "__main__":
    main()
