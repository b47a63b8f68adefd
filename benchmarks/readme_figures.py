"""Re-measure the README's CPU figures and say which fall outside the ranges it states.

    python -m trm_benchmarks.readme_figures --out DIR                  # every figure: about 25 min on 2 cores
    python -m trm_benchmarks.readme_figures --out DIR --only quick     # the quick start's: about 2 min
    OMP_NUM_THREADS=1 python -m trm_benchmarks.readme_figures --out DIR

Training is deterministic on one machine but not across machines (CPU kernels differ), so the
README gives each figure as a range that held on more than one machine and thread count, and
says where it was measured. This runs the README's own commands in DIR (the data is built
there, as on a fresh clone; the package's install is not timed), reads what they report
(metrics.jsonl, `trm eval --json`), and prints each figure against its range; DIR/figures.json
holds every measurement. The exit status is 1 when a figure falls outside its range.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


@dataclasses.dataclass(frozen=True)
class Figure:
    key: str
    group: str  # the commands that measure it (GROUPS)
    what: str  # the figure, in words
    low: float
    high: float
    unit: str  # of low and high
    stated: str  # the README's text of the range (tests/test_readme.py checks it is there)

    def holds(self, value: float) -> bool:
        return self.low <= value <= self.high


# The README's figures and their ranges. Each range covers what was measured with 2 threads and
# with 1 (OMP_NUM_THREADS=1) on one 2-core x86_64 machine (2026-12-01), the figures the README
# gave before from the same machine when busier, and another 2-core machine's.
FIGURES = [
    Figure("quick_seconds", "quick", "`trm train` of the quick start (the data built, the install not timed)", 40,
           120, "s", "expect 40-120 s"),
    Figure("quick_solved", "quick", "held-out puzzles solved of 200", 195, 200, "", "195-200 of 200 solved"),
    Figure("quick_exact_step_200", "quick", "training batches' exact accuracy at step 200", 0.6, 0.95, "",
           "training exact accuracy of 0.6-0.95 at step 200"),
    Figure("sudoku6_minutes", "sudoku6", "the 6x6 recipe's training", 3, 8, "min", "This recipe takes 3-8 min"),
    Figure("sudoku6_exact", "sudoku6", "6x6 exact accuracy with 4 fixed steps, 1,000 held-out puzzles", 79, 84, "%",
           "79-84% of 1,000 held-out puzzles"),
    Figure("sudoku6_gain_4", "sudoku6", "halting at threshold 4, max 4 steps: exact accuracy gained over fixed", -0.5,
           1.5, "points", "-0.5 to +1.5 points"),
    Figure("sudoku6_gain_16", "sudoku6", "halting at threshold 4, max 16 steps: exact accuracy gained over fixed",
           -0.5, 1.5, "points", "-0.5 to +1.5 points"),
    Figure("sudoku6_speedup_16", "sudoku6", "halting / fixed puzzles/s at max 16 steps", 3, 6, "x",
           "runs 3-6x the fixed-step puzzles/s at 16 steps"),
    Figure("sudoku6_threshold0_drop", "sudoku6", "exact accuracy halting at threshold 0 loses against fixed", 10, 25,
           "points", "drops 10-25 points"),
    Figure("maze7_seconds", "maze7", "`trm train --preset maze7`", 60, 170, "s", "`maze7` takes 60-170 s"),
    Figure("maze7_solved", "maze7", "held-out mazes solved of 64", 48, 58, "", "solves 48-58 of its 64 held-out mazes"),
]  # fmt: skip


def _trm(args: list[str], cwd: Path, log) -> float:
    """Run `trm ARGS` in `cwd` (the installed command, as a user runs it); its seconds."""
    command = [sys.executable, "-c", "from trm.cli import main; main()", *args]
    log(f"$ trm {shlex.join(args)}")
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"trm {shlex.join(args)} exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return seconds


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _test(run: Path) -> dict:
    return [r for r in _records(run) if r["split"] == "test"][-1]


def quick(out: Path, log) -> dict:
    seconds = _trm(["train", "--out", "runs/quick", "--no-progress"], out, log)
    records = _records(out / "runs/quick")
    step_200 = next(r for r in records if r["split"] == "train" and r["step"] == 200)
    test = _test(out / "runs/quick")
    return {"quick_seconds": seconds, "quick_solved": round(test["exact_accuracy"] * test["count"]),
            "quick_exact_step_200": step_200["exact_accuracy"]}  # fmt: skip


def sudoku6(out: Path, log) -> dict:
    seconds = _trm(["train", "--preset", "sudoku4", "--set", "data.size=6", "--set", "data.num_test=1000", "--set",
                    "train.steps=2000", "--out", "runs/sudoku6", "--no-progress"], out, log)  # fmt: skip
    test = _test(out / "runs/sudoku6")
    result = {"sudoku6_minutes": seconds / 60, "sudoku6_exact": 100 * test["exact_accuracy"]}
    _trm(["eval", "runs/sudoku6", "--halt", "--threshold", "4", "--steps", "4,16", "--compare", "--json",
          "sweep.json"], out, log)  # fmt: skip
    rows = json.loads((out / "sweep.json").read_text())["results"]
    for depth in (4, 16):
        halting, fixed = (
            next(r for r in rows if r["mode"] == m and r["max_steps"] == depth) for m in ("halting", "fixed")
        )
        result[f"sudoku6_gain_{depth}"] = 100 * (halting["exact_accuracy"] - fixed["exact_accuracy"])
        if depth == 16:
            ratios = sorted(halting["speedup_rounds"])
            result["sudoku6_speedup_16"] = ratios[len(ratios) // 2]
    _trm(["eval", "runs/sudoku6", "--halt", "--compare", "--json", "threshold0.json"], out, log)
    rows = json.loads((out / "threshold0.json").read_text())["results"]
    halting, fixed = (next(r for r in rows if r["mode"] == m) for m in ("halting", "fixed"))
    result["sudoku6_threshold0_drop"] = 100 * (fixed["exact_accuracy"] - halting["exact_accuracy"])
    return result


def maze7(out: Path, log) -> dict:
    seconds = _trm(["train", "--preset", "maze7", "--out", "runs/maze7", "--no-progress"], out, log)
    test = _test(out / "runs/maze7")
    return {"maze7_seconds": seconds, "maze7_solved": round(test["exact_accuracy"] * test["count"])}


GROUPS: dict[str, Callable[[Path, Callable], dict]] = {"quick": quick, "sudoku6": sudoku6, "maze7": maze7}


def check(measured: dict[str, float]) -> list[dict]:
    """Each measured figure against its stated range."""
    return [{"key": f.key, "what": f.what, "range": [f.low, f.high], "unit": f.unit, "value": measured[f.key],
             "inside": f.holds(measured[f.key])} for f in FIGURES if f.key in measured]  # fmt: skip


def machine() -> dict:
    return {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d")}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs, data and figures.json")
    parser.add_argument("--only", default=",".join(GROUPS), help="comma-separated, from %(default)s")
    args = parser.parse_args(argv)
    groups = [g.strip() for g in args.only.split(",") if g.strip()]
    if unknown := [g for g in groups if g not in GROUPS]:
        parser.error(f"--only {','.join(unknown)}: choose from {', '.join(GROUPS)}")
    if (args.out / "runs").exists() and any((args.out / "runs").iterdir()):
        parser.error(f"--out {args.out}: holds runs already; give a new or empty folder")
    args.out.mkdir(parents=True, exist_ok=True)
    measured: dict[str, float] = {}
    for group in groups:
        measured |= GROUPS[group](args.out, lambda line: print(line, flush=True))
        results = {"machine": machine(), "figures": check(measured)}
        (args.out / "figures.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"\n{'figure':64} {'stated range':>16} {'measured':>10}")
    for f in results["figures"]:
        low, high = f["range"]
        stated = f"{low:g}-{high:g} {f['unit']}"
        mark = "" if f["inside"] else "   OUTSIDE"
        print(f"{f['what'][:64]:64} {stated:>16} {f['value']:>10.3g}{mark}")
    outside = [f for f in results["figures"] if not f["inside"]]
    print(f"{len(results['figures']) - len(outside)} of {len(results['figures'])} inside their range "
          f"({results['machine']['processor']}, {results['machine']['torch_threads']} torch threads)")  # fmt: skip
    return 1 if outside else 0


if __name__ == "__main__":
    sys.exit(main())
