"""Every Triton kernel compiles for every listed architecture (sm_80 ... sm_120) in bf16, fp16
and fp32 (the kernels a GPU runs in fp32: attention with its fp32 tiles, the element-wise and
norm kernels; the GEMM-epilogue and token-mixer kernels are not launched in fp32), can launch
there, and moves 16 bytes per access where memory-bound."""

import importlib
import itertools
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
from trm_benchmarks.ptx import DTYPES  # noqa: E402
from trm_kernels import arch as A  # noqa: E402
from trm_kernels import channel_mlp, sandwich, token_mlp  # noqa: E402

concat_linear = importlib.import_module("trm_kernels.concat_linear")  # the module: trm_kernels.concat_linear is the op

HALF = ("bf16", "fp16")  # the dtypes the GEMM-epilogue and token-mixer kernels run in on a GPU

MEMORY_BOUND = ["add_rmsnorm_fwd hidden", "add_rmsnorm_fwd sequence", "swiglu_fwd", "swiglu_bwd", "swiglu_fwd geglu",
                "swiglu_bwd geglu", "inject", "sandwich_rmsnorm_fwd hidden 4096"]  # fmt: skip


# The oldest Triton we claim (pyproject.toml's floor), installed on its own with
# `pip install --target DIR triton==3.6.0`: where TRM_TRITON_OLDEST names that folder (as
# .ci/run does), every test here runs on a second, compile-only pass made with it (bf16, and
# fp32; fp16 compiles as bf16 does), held to the spill budget below instead of none.
OLDEST = os.environ.get("TRM_TRITON_OLDEST")
OLDEST_VERSION, OLDEST_DTYPES = "3.6", ("bf16", "fp32")
# The spills (store + load bytes) the oldest Triton may make, by kernel. The tiles are chosen so
# that the installed Triton spills nowhere; where no tile did that with 3.6 too, 3.6's bytes are
# named here (ptxas caps registers differently for its code: a tile clean with one spills with
# the other), and kernels/README.md says so.
OLDEST_SPILLS: dict[str, int] = {
    "attention_bwd_dkdv causal GQA mask d128": 44,  # fp32 on sm_80 (48 registers); 32 x 16 spills with 3.9
    "attention_fwd causal GQA mask d128 interleaved RoPE": 32,  # bf16/fp16 on sm_86/89 (168 registers)
}


class Report(dict):
    """{"sm_XX": {dtype: {kernel: entry}}} of one compile pass, with the Triton it ran."""

    def __init__(self, archs: dict, triton: str, dtypes: tuple[str, ...], oldest: bool):
        super().__init__(archs)
        self.triton, self.dtypes, self.oldest = triton, dtypes, oldest

    def spill_budget(self, name: str) -> int:
        return OLDEST_SPILLS.get(name, 0) if self.oldest else 0


@pytest.fixture(scope="module", params=["installed", "oldest"])
def report(request):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile real kernels
    args, oldest = [sys.executable, "-m", "trm_benchmarks.ptx"], request.param == "oldest"
    if oldest:
        if not OLDEST:
            pytest.skip("TRM_TRITON_OLDEST is not set (.ci/run sets it: a folder holding triton 3.6)")
        env["PYTHONPATH"] = os.pathsep.join([OLDEST, *filter(None, [env.get("PYTHONPATH")])])
        args += ["--dtype", ",".join(OLDEST_DTYPES)]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    triton = result["environment"]["triton"]
    assert triton.startswith(OLDEST_VERSION) if oldest else not triton.startswith(OLDEST_VERSION + ".")
    return Report(result["archs"], triton, OLDEST_DTYPES if oldest else DTYPES, oldest)


def _spills(r: dict) -> int:
    return (r.get("spill_store_bytes") or 0) + (r.get("spill_load_bytes") or 0)


def _half(by_dtype: dict):
    return [(dtype, rows) for dtype, rows in by_dtype.items() if dtype in HALF]


def _entries(report):
    for target, by_dtype in report.items():
        for dtype, rows in by_dtype.items():
            for name, r in rows.items():
                yield target, dtype, name, r


def test_every_kernel_compiles_and_launches_on_every_architecture(report):
    assert set(report) == {a.target for a in A.ARCHS.values()}
    assert all(set(by_dtype) == set(report.dtypes) for by_dtype in report.values())
    assert set(DTYPES) == {*HALF, "fp32"}
    failed = {(t, d, n): r.get("error") or r.get("ptxas_error") or r.get("launch_problem")
              for t, d, n, r in _entries(report) if not (r["ok"] and r.get("launchable"))}  # fmt: skip
    assert not failed
    for t, d, n, r in _entries(report):
        assert 0 < r["registers"] <= 255 and r["blocks_per_sm"] >= 1, (t, d, n)


def _token_mlp_keys(capability: int) -> list[tuple[int, ...]]:
    """(sequence tile, BLOCK_D, BLOCK_I, warps) of every mlp_t forward config this architecture takes."""
    return [(seq_class, *tile) for seq_class, tiles in token_mlp.configs(capability).items() for tile in tiles]


def test_the_pruning_table_covers_every_compiled_token_mlp_config(report):
    """`token_mlp.SHARED_BYTES` is what the autotuner prunes with: a compiled kernel may not need more."""
    for capability, a in A.ARCHS.items():
        for dtype, rows in _half(report[a.target]):
            for key in _token_mlp_keys(capability):
                for variant in ("", " training"):  # the training form writes the sum and rstd too
                    compiled = rows[token_mlp.config_name(*key) + variant]["shared_bytes"]
                    assert compiled <= token_mlp.SHARED_BYTES[key][capability], (a.target, dtype, key, variant)


def test_the_mlp_t_forward_configs_do_not_spill_on_the_architectures_that_take_them(report):
    """Each architecture's family of configs (token_mlp.FAMILY_CONFIGS), with and without grad."""
    for capability, a in A.ARCHS.items():
        for dtype, rows in report[a.target].items():
            for key in _token_mlp_keys(capability) if dtype in HALF else []:
                for variant in ("", " training"):
                    name = token_mlp.config_name(*key) + variant
                    assert _spills(rows[name]) <= report.spill_budget(name), (a.target, dtype, name, report.triton)


def test_the_mlp_t_backward_kernels_fit_their_table_use_tensor_cores_and_do_not_spill(report):
    """The dh and weight-gradient kernels of the training backward, on every architecture:
    within `token_mlp.BWD_SHARED_BYTES` (what decides whether training takes them), matrix
    instructions, operands by cp.async, no spills."""
    for capability, a in A.ARCHS.items():
        for dtype, rows in _half(report[a.target]):
            for (block_s, which), row in token_mlp.BWD_SHARED_BYTES.items():
                r = rows[token_mlp.bwd_config_name(which, block_s)]
                assert r["shared_bytes"] <= row[capability], (a.target, dtype, block_s, which, r["shared_bytes"])
                assert r["mma_sync"] + r["wgmma"] + r["tcgen05"] > 0 and r["cp_async"] > 0, (a.target, which)
                assert _spills(r) == 0, (a.target, dtype, which, report.triton)
                assert r["other_loads"] == 0, (a.target, dtype, which, r["accesses"])


SWIGLU_MLP = [channel_mlp.config_name(which, *c, act) for c in channel_mlp.CONFIGS for which in ("fwd", "bwd")
              for act in channel_mlp.ACTIVATIONS]  # fmt: skip
NORM_EPILOGUE = [channel_mlp.norm_config_name(*c) + variant for c in channel_mlp.NORM_CONFIGS
                 for variant in ("", " with weight")]  # fmt: skip
SANDWICH = [f"sandwich_rmsnorm_{which} hidden {n}" for n in (512, 4096, sandwich.MAX_N) for which in ("fwd", "bwd")]
CONCAT_LINEAR = [concat_linear.config_name(*c) for c in concat_linear.CONFIGS]


def _weight_loads(name: str) -> int:
    """Loads narrower than 16 bytes a kernel may make: a weighted norm epilogue's one load of its
    fp32 weight (512 values over 256 threads: 8 bytes a thread, once a program)."""
    return 1 if name.endswith(" with weight") else 0


def test_the_norm_epilogue_kernels_fit_their_stated_shared_memory_and_use_mma_sync(report):
    """The down GEMM + residual + RMSNorm tiles (32 rows) take mma.sync on every architecture,
    Hopper and Blackwell included (a warpgroup MMA needs 64 rows), within NORM_SHARED_BYTES; the
    operands by cp.async, nothing else loaded but the norm weight (the " with weight" variants)."""
    for t, d, n, r in _entries(report):
        if n in NORM_EPILOGUE:
            assert r["shared_bytes"] <= channel_mlp.NORM_SHARED_BYTES and r["mma_sync"] > 0, (t, d, n)
            assert r["cp_async"] > 0 and r["other_loads"] <= _weight_loads(n), (t, d, n, r["accesses"])


def test_the_one_kernel_sublayer_fits_its_stated_shared_memory_and_does_not_spill(report):
    names = [channel_mlp.one_kernel_config_name() + (f" {act}" if act != "swiglu" else "") + weighted
             for weighted in ("", " with weight") for act in channel_mlp.ACTIVATIONS]  # fmt: skip
    for t, d, n, r in _entries(report):
        if n in names:
            assert r["shared_bytes"] <= channel_mlp.ONE_KERNEL_SHARED_BYTES and r["mma_sync"] > 0, (t, d)
            assert _spills(r) <= report.spill_budget(n) and r["cp_async"] > 0, (t, d, r)
            assert r["other_loads"] <= _weight_loads(n), (t, d, n, r["accesses"])


def test_the_pruning_table_covers_every_compiled_swiglu_mlp_config(report):
    """`channel_mlp.SHARED_BYTES` (the forward's, the larger) bounds both kernels of each config,
    with each activation's epilogue."""
    assert set(channel_mlp.SHARED_BYTES) == set(channel_mlp.CONFIGS)
    for capability, a in A.ARCHS.items():
        for dtype, rows in _half(report[a.target]):
            for key, row in channel_mlp.SHARED_BYTES.items():
                for which, act in itertools.product(("fwd", "bwd"), channel_mlp.ACTIVATIONS):
                    compiled = rows[channel_mlp.config_name(which, *key, act)]["shared_bytes"]
                    assert compiled <= row[capability], (a.target, dtype, which, act, key, compiled)


def test_swiglu_mlp_kernels_stage_tiles_asynchronously_and_store_16_bytes(report):
    """The GEMM operands by cp.async (or TMA-free async copies), every store 16 bytes wide."""
    for t, d, n, r in _entries(report):
        if n in SWIGLU_MLP:
            assert r["cp_async"] > 0 and r["other_loads"] == 0 and r["stores_16B"] > 0, (t, d, n, r["accesses"])
            assert all(".v4" in op for op in r["accesses"] if op.startswith("st")), (t, d, n, r["accesses"])


def test_concat_linear_configs_fit_their_pruning_table_stage_tiles_asynchronously_and_store_16_bytes(report):
    """`concat_linear.SHARED_BYTES` is what the autotuner prunes with: a compiled kernel may not
    need more; both K loops' operands by cp.async, every output store 16 bytes wide."""
    assert set(concat_linear.SHARED_BYTES) == set(concat_linear.CONFIGS)
    for capability, a in A.ARCHS.items():
        for dtype, rows in _half(report[a.target]):
            for config, row in concat_linear.SHARED_BYTES.items():
                r = rows[concat_linear.config_name(*config)]
                assert r["shared_bytes"] <= row[capability], (a.target, dtype, config, r["shared_bytes"])
                assert r["cp_async"] > 0 and r["stores_16B"] > 0, (a.target, dtype, config, r["accesses"])
                assert all(".v4" in op for op in r["accesses"] if op.startswith("st")), (a.target, dtype, config)


@pytest.mark.parametrize("name", MEMORY_BOUND)
def test_memory_bound_kernels_move_16_bytes_per_access(report, name):
    for target, by_dtype in report.items():
        for dtype, rows in by_dtype.items():
            r = rows[name]
            assert r["loads_16B"] > 0 and r["other_loads"] == 0, (target, dtype, r["accesses"])
            assert all(".v4" in op for op in r["accesses"] if op.startswith("st") and "b16" in op), (target, dtype)


ATTENTION = ("attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq", "attention_fwd causal GQA mask d128",
             "attention_bwd_dkdv causal GQA mask d128", "attention_bwd_dq causal GQA mask d128",
             "attention_fwd interleaved RoPE", "attention_fwd causal GQA mask d128 interleaved RoPE",
             "attention_bwd_dkdv causal GQA mask d128 interleaved RoPE",
             "attention_bwd_dq causal GQA mask d128 interleaved RoPE", "attention_fwd causal GQA mask d128 window",
             "attention_bwd_dkdv causal GQA mask d128 window",
             "attention_bwd_dq causal GQA mask d128 window")  # fmt: skip
# QK-norm's pass (trm_kernels.qk_norm) at head size 128
QK_NORM = ("qk_norm_fwd before RoPE d128", "qk_norm_fwd after interleaved RoPE, cache offsets d128",
           "qk_norm_bwd before RoPE d128", "qk_norm_bwd after RoPE d128, no weights",
           "qk_norm_bwd after interleaved RoPE d128")  # fmt: skip
# the KV-cache kernels: a decode tile is 16 rows (a group's heads), under a warpgroup product's 64
KV_CACHE = ("kv_cache_write", "kv_cache_attn decode, split", "kv_cache_attn prefill chunk",
            "kv_cache_attn interleaved, window", "kv_cache_attn decode, interleaved",
            "kv_cache_combine")  # fmt: skip


def test_matrix_kernels_use_each_architectures_tensor_cores(report):
    """mma.sync before Hopper and on consumer Blackwell, wgmma on Hopper, tcgen05 on sm_100;
    an mlp_t tile of fewer than 64 hidden rows (S <= 256's 32x32) is under a warpgroup
    product's 64 rows and takes mma.sync there too."""
    field = {"mma.sync": "mma_sync", "wgmma": "wgmma", "tcgen05": "tcgen05"}
    for capability, a in A.ARCHS.items():
        matrix = {name: field[a.mma] for name in (*ATTENTION, *SWIGLU_MLP, *CONCAT_LINEAR)}
        matrix |= {token_mlp.config_name(*key): field[a.mma] if key[1] >= 64 else "mma_sync"
                   for key in _token_mlp_keys(capability)}  # fmt: skip
        for dtype, rows in _half(report[a.target]):  # fp32's IEEE products take no tensor cores
            for name, instruction in matrix.items():
                assert rows[name][instruction] > 0, (a.target, dtype, name, instruction)


def test_fused_mlp_t_sublayer_on_hopper_uses_async_copies_and_does_not_spill(report):
    """Every autotuner config on sm_90: the weight tiles by cp.async (no ld.global), h and the
    output in 16-byte accesses, no register spills."""
    for key in _token_mlp_keys(90):
        r = report["sm_90"]["bf16"][token_mlp.config_name(*key)]
        assert r["other_loads"] == 0 and r["loads_16B"] > 0 and r["cp_async"] > 0, (key, r)
        assert _spills(r) <= report.spill_budget(token_mlp.config_name(*key)), (key, r)


NO_SPILLS = ("add_rmsnorm_fwd hidden", "add_rmsnorm_bwd hidden", "add_rmsnorm_fwd pre-norm, weight",
             "add_rmsnorm_bwd pre-norm, weight", "swiglu_fwd", "swiglu_bwd", "inject", "inject broadcast",
             "attention_bwd_delta", "attention_bwd_rope", *ATTENTION, *SWIGLU_MLP, *NORM_EPILOGUE, *CONCAT_LINEAR,
             "add_rmsnorm_fwd sequence", "add_rmsnorm_bwd sequence", "add_rmsnorm_fwd widest",
             "add_rmsnorm_bwd widest", "cross_entropy_fwd stablemax", "cross_entropy_fwd softmax",
             "cross_entropy_fwd stablemax widest", *SANDWICH, *KV_CACHE, "attention_bwd_rope interleaved",
             "swiglu_fwd geglu", "swiglu_bwd geglu", *QK_NORM)  # fmt: skip


def test_attention_and_the_elementwise_kernels_do_not_spill_anywhere(report):
    """Attention's tiles are chosen per architecture family (trm_kernels.attention.tiles) so
    that TRM's variant and a causal GQA one at head size 128 fit registers everywhere; the
    SwiGLU MLP's configs are those that fit everywhere."""
    for t, d, n, r in _entries(report):
        if n in NO_SPILLS:
            assert _spills(r) <= report.spill_budget(n), (t, d, n, r["registers"], report.triton)
