"""The GPU's first look (trm_benchmarks.first), its op table beside the peers
(trm_benchmarks.peer_ops) and the peers' wheels (trm_benchmarks.peers), on a CPU: sections
skipped with the reason, budgets on a stand-in clock, peers importable or not."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from trm_benchmarks import first, peer_ops, peers
from trm_kernels import reference as R

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_sh_first_on_a_cpu_exits_0_quickly_and_says_why_each_section_was_skipped(tmp_path):
    done = subprocess.run(["bash", "benchmarks/gpu.sh", str(tmp_path / "out"), "first"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    summary = (tmp_path / "out" / "summary.md").read_text()
    for section in ("ceilings", "doctor", "ops", "model"):
        assert f"| {section} | skipped: no CUDA device |" in summary
    for section in ("ceilings", "ops", "model"):  # (trm doctor writes doctor/ itself, when it runs)
        assert json.loads((tmp_path / "out" / f"{section}.json").read_text())["status"] == "skipped: no CUDA device"
    assert "| environment | ok |" in summary and "`doctor/doctor.json`" in summary  # the layout it would write
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(len(p.relative_to(tmp_path / "out").parts) <= 2 for p in files)


class _Clock:
    """A stand-in clock that the stand-in timer advances: each timed run takes 30 s."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _timer(clock: _Clock, times):
    it = iter(times)

    def timer(fn, device):
        fn()
        clock.now += 30
        return next(it)

    return timer


def _fake_liger(monkeypatch):
    """Stand-in modules with Liger-Kernel's names, computing the reference ops."""
    ops = {
        "liger_kernel.ops.fused_add_rms_norm": ("LigerFusedAddRMSNormFunction",
                                                lambda x, r, w, eps: (R.add_rmsnorm(x, r, -1, eps) * w, x + r)),
        "liger_kernel.ops.swiglu": ("LigerSiLUMulFunction", lambda a, b: torch.nn.functional.silu(a) * b),
        "liger_kernel.ops.cross_entropy": ("LigerCrossEntropyFunction",
                                           lambda x, y, *rest: (R.softmax_cross_entropy(x, y), None, None, None)),
    }  # fmt: skip
    for name in ("liger_kernel", "liger_kernel.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    for module, (cls, fn) in ops.items():
        mod = types.ModuleType(module)
        setattr(mod, cls, types.SimpleNamespace(apply=fn))
        monkeypatch.setitem(sys.modules, module, mod)
    monkeypatch.setitem(sys.modules, "quack", None)  # QuACK does not import here


def test_the_op_table_runs_each_peer_that_imports_and_names_the_others(monkeypatch):
    _fake_liger(monkeypatch)
    clock = _Clock()
    # per provider: forward, then forward + backward; the norm case: eager 4/8, Liger 2/4, ours 1/2
    times = [4.0, 8.0, 2.0, 4.0, 1.0, 2.0] * 4
    rows, skipped = peer_ops.run(torch.device("cpu"), first.Budget(1e9, clock), quick=True, compile_ok=False,
                                 timer=_timer(clock, times))  # fmt: skip
    norm = {r["provider"]: r for r in rows if r["op"] == "rmsnorm(x + r) forward"}
    assert set(norm) == {"eager", "Liger-Kernel", "trm triton"}
    assert norm["trm triton"]["vs_best_peer"] == pytest.approx(2.0)  # Liger's 2 ms over our 1 ms
    assert norm["eager"]["vs_best_peer"] == pytest.approx(0.5) and norm["Liger-Kernel"]["gbps"] > 0
    assert any(s.startswith("QuACK: not installed") for s in skipped)
    assert {r["op"].rsplit(" ", 1)[0] for r in rows} >= {"rmsnorm(x + r)", "swiglu", "softmax cross-entropy"}
    assert any(r["op"] == "attention forward+backward" and r["tflops"] for r in rows)


def test_a_section_stops_between_cases_at_its_budget_and_lists_what_it_skipped(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)
    monkeypatch.setitem(sys.modules, "quack", None)
    clock = _Clock()
    budget = first.Budget(100, clock)  # each provider takes 60 s here: the second finds 40 s left, the third none
    rows, skipped = peer_ops.run(torch.device("cpu"), budget, quick=True, compile_ok=False,
                                 timer=_timer(clock, [1.0] * 100))  # fmt: skip
    assert {r["provider"] for r in rows} == {"eager", "trm triton"} and len(rows) == 4  # the norm case only
    over = [s for s in skipped if s.endswith("over the section's budget")]
    assert over and over[0].startswith("swiglu")  # every later case and provider is listed


def test_a_section_that_raises_costs_no_other_and_each_file_is_written_as_it_ends(tmp_path, monkeypatch):
    def broken(ctx, budget):
        raise RuntimeError("boom")

    monkeypatch.setitem(first.RUNS, "environment", broken)
    results = first.run(tmp_path, torch.device("cpu"), sections={"environment": 10, "ceilings": 40})
    assert results["environment"]["status"] == "failed: RuntimeError: boom"
    assert results["ceilings"]["status"] == "skipped: no CUDA device"
    assert "failed: RuntimeError: boom" in (tmp_path / "summary.md").read_text()


def test_peer_wheel_requirements_follow_markers_and_extras(tmp_path):
    """The wheel resolver's reading of METADATA: markers for the target Python, extras on request."""
    import zipfile

    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        requires = ["torch", "einops>=0.8", 'strenum; python_version < "3.11"', 'libs-cu13; extra == "cu13"']
        z.writestr("demo-1.0.dist-info/METADATA", "Name: demo\n" + "".join(f"Requires-Dist: {r}\n" for r in requires))
    assert peers.requirements(wheel, "3.12") == ["torch", "einops>=0.8"]
    assert peers.requirements(wheel, "3.10") == ["torch", "einops>=0.8", "strenum"]
    assert peers.requirements(wheel, "3.12", frozenset({"cu13"})) == ["torch", "einops>=0.8", "libs-cu13"]
    assert peers.PROVIDED.match("torch") and peers.PROVIDED.match("nvidia-cublas-cu12")
    assert not peers.PROVIDED.match("nvidia-cutlass-dsl")


@pytest.mark.skipif(os.environ.get("TRM_OFFLINE") == "1", reason="TRM_OFFLINE=1: no package index")
def test_the_peer_wheels_install_without_an_index_on_python_3_12(tmp_path):
    """Liger-Kernel's wheels for Python 3.12 / manylinux x86_64 (downloaded: about 1 MB), then a
    dry-run install of the folder with no index, for that Python and platform."""
    done = subprocess.run([sys.executable, "-m", "trm_benchmarks.peers", "download", str(tmp_path / "wheels"),
                           "--peers", "liger"], capture_output=True, text=True, timeout=300)  # fmt: skip
    if done.returncode != 0 and "pip download" in done.stderr:
        pytest.skip(f"no package index here: {done.stderr.strip()[-200:]}")
    assert done.returncode == 0, done.stderr[-2000:]
    wheels = sorted(str(p) for p in (tmp_path / "wheels").glob("*.whl"))
    assert any("liger_kernel" in w for w in wheels)
    platforms = [arg for p in peers.PLATFORMS for arg in ("--platform", p)]
    check = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-deps",
                            "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", *platforms,
                            "--target", str(tmp_path / "target"), *wheels], capture_output=True, text=True,
                           timeout=120)  # fmt: skip
    assert check.returncode == 0, check.stderr[-2000:]
    assert "Would install liger_kernel-" in check.stdout
