"""Run the benchmarks on the machine at hand and write results.{json,md,png} under --out.

python -m benchmarks.run --out benchmarks/results/h100-2026-11-23       # full, on a GPU
python -m benchmarks.run --out /tmp/bench --quick                       # small shapes, any machine
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from . import model, ops
from .common import copy_ceiling, environment, gemm_ceiling, write_results


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory for results.json/.md/.png")
    parser.add_argument("--quick", action="store_true", help="small shapes (CPU smoke run)")
    parser.add_argument("--only", choices=("ops", "model"), help="run one part")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile providers")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or device.type != "cuda"
    env = environment(device)
    print(f"benchmarking on {env['device']} (torch {env['torch']}, triton {env['triton']})", flush=True)
    ceilings = {
        "copy_gbps": copy_ceiling(device, 2**26 if quick else 2**31),
        "gemm_tflops": gemm_ceiling(device, 512 if quick else 8192),
    }
    print(f"ceilings: copy {ceilings['copy_gbps']:.0f} GB/s, GEMM {ceilings['gemm_tflops']:.1f} TFLOP/s", flush=True)
    compile_ok = not args.no_compile
    rows = []
    if args.only in (None, "ops"):
        rows += ops.run(device, quick, compile_ok)
    if args.only in (None, "model"):
        rows += model.run(device, quick, compile_ok, ceilings["gemm_tflops"])
    write_results(args.out, env, ceilings, rows)
    print((args.out / "results.md").read_text())
    return args.out


if __name__ == "__main__":
    main()
