"""Every Triton kernel compiles for Hopper (sm_90), with 16-byte accesses where memory-bound."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile real kernels
    done = subprocess.run([sys.executable, "-m", "trm_benchmarks.ptx"], capture_output=True, text=True, env=env,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_every_kernel_compiles_for_sm90(report):
    failed = {name: r["error"] for name, r in report.items() if not r["ok"]}
    assert not failed


@pytest.mark.parametrize("name", ["add_rmsnorm_fwd hidden", "add_rmsnorm_fwd sequence", "swiglu_fwd", "swiglu_bwd",
                                  "inject"])  # fmt: skip
def test_memory_bound_kernels_move_16_bytes_per_access(report, name):
    accesses = report[name]["accesses"]
    assert report[name]["vector_loads"] > 0 and report[name]["scalar_loads"] == 0, accesses
    assert all(".v4" in op for op in accesses if op.startswith("st") and "b16" in op), accesses


def test_attention_uses_matrix_instructions(report):
    for name in ("attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq"):
        assert report[name]["mma"] > 0, name


def test_fused_mlp_t_sublayer_uses_wgmma_async_copies_and_does_not_spill(report):
    """Every autotuner config: Hopper's warpgroup MMA, the h tile and output in 16-byte
    accesses, the weight tiles by cp.async (no ld.global), no register spills."""
    names = [name for name in report if name.startswith("token_mlp_rmsnorm_fwd")]
    assert len(names) >= 2
    for name in names:
        r = report[name]
        assert r["wgmma"] > 0 and r["scalar_loads"] == 0 and r["vector_loads"] > 0, (name, r)
        assert r["spill_store_bytes"] == 0 and r["spill_load_bytes"] == 0, (name, r)


def test_ptxas_reports_resources_and_elementwise_kernels_do_not_spill(report):
    for name, r in report.items():
        assert "ptxas_error" not in r, (name, r.get("ptxas_error"))
        assert 0 < r["registers"] <= 255, name
    for name in ("add_rmsnorm_fwd hidden", "add_rmsnorm_bwd hidden", "swiglu_fwd", "swiglu_bwd", "inject"):
        assert report[name]["spill_store_bytes"] == 0 and report[name]["spill_load_bytes"] == 0, name
