"""Launches a GPU would refuse, found without one: every kernel's grid at the largest shapes
users run (trm_benchmarks.launches records them on meta tensors, executing nothing), the
device each launch runs under, and launch()'s own checks."""

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")
from trm_kernels import _triton  # noqa: E402

KERNELS = {  # every Triton kernel of the package
    "_add_rmsnorm_fwd", "_add_rmsnorm_bwd", "_attn_fwd", "_attn_bwd_delta", "_rope_qk", "_attn_bwd_dkdv",
    "_attn_bwd_dq", "_ce_fwd", "_inject", "_swiglu_fwd", "_swiglu_bwd", "_linear_swiglu_fwd", "_swiglu_mlp_bwd",
    "_down_add_rmsnorm_fwd", "_mlp_add_rmsnorm_fwd", "_token_mlp_rmsnorm_fwd", "_token_mlp_bwd_dh",
    "_token_mlp_bwd_dw", "_concat_linear_fwd", "_cache_write", "_cache_attn", "_cache_combine", "_sandwich_fwd",
    "_sandwich_bwd", "_qk_norm_fwd", "_qk_norm_bwd",
}  # fmt: skip


@pytest.mark.parametrize("capability, triton_version", [(90, "installed"), (86, "installed"), (90, "oldest")])
def test_every_launch_at_users_largest_shapes_is_within_cudas_limits_and_under_its_tensors_device(
    capability, triton_version
):
    """sudoku-att at batch 4096 and 8192 (bf16, and fp32 at 8192), sudoku-mlp likewise, the
    maze at 1536 x 916 (attention and mlp_t), a language model of 8 x 4096 tokens at hidden
    4096 with 32/8 heads of 128: forward and backward, fused and composed. Before the grids
    were split (and rows moved to axis x), 32 of these launches were over a limit (batch x
    heads on axis y from batch 8192; the maze's 87,936 row blocks of add_rmsnorm on axis y) and none ran under
    its tensors' device. In fp32 a GPU runs cuBLAS + the element-wise kernels, not the GEMM
    epilogue kernels (their fp32 tiles do not fit the shared memory of sm_86/89/120). With the
    oldest Triton we claim too (its launcher and autotuner are what the recorder replaces)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # plan as a GPU launches
    if triton_version == "oldest":  # the oldest Triton we claim (see tests/test_ptx.py), where .ci/run installs it
        if not os.environ.get("TRM_TRITON_OLDEST"):
            pytest.skip("TRM_TRITON_OLDEST is not set (.ci/run sets it: a folder holding triton 3.6)")
        env["PYTHONPATH"] = os.pathsep.join([os.environ["TRM_TRITON_OLDEST"], *filter(None, [env.get("PYTHONPATH")])])
    done = subprocess.run([sys.executable, "-m", "trm_benchmarks.launches", "--json", "--capability",
                           str(capability)], capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    launches = json.loads(done.stdout)
    assert {launch["kernel"] for launch in launches} == KERNELS
    cases = {launch["case"] for launch in launches}
    for name in ("sudoku-att batch 8192", "sudoku-mlp batch 8192", "maze batch 1536 x 916",
                 "LM 8 x 4096, hidden 4096, 32/8 heads", "sudoku-att batch 8192, fp32"):  # fmt: skip
        assert {f"{name} (fused)", f"{name} (composed)"} <= cases
    assert [launch for launch in launches if launch["problem"]] == []
    for launch in launches:
        assert launch["current"] == "meta" == launch["devices"][0], launch
        assert 0 < launch["grid"][0] < 2**31 and all(n <= 65535 for n in launch["grid"][1:]), launch
    fp32 = {launch["kernel"] for launch in launches if launch["case"] == "sudoku-att batch 8192, fp32 (fused)"}
    assert "_attn_fwd" in fp32 and not fp32 & {"_linear_swiglu_fwd", "_swiglu_mlp_bwd", "_down_add_rmsnorm_fwd"}
    biggest = max(launches, key=lambda launch: launch["grid"][0])
    assert biggest["grid"][0] > 65535  # the large products are there, on axis x


def test_grid_problem_names_the_axis_and_the_limit():
    assert _triton.grid_problem((2**31 - 1, 65535, 65535)) is None
    assert "axis y" in _triton.grid_problem((2, 65536)) and "65,535" in _triton.grid_problem((2, 65536))
    assert "axis x" in _triton.grid_problem((2**31,))
    assert _triton.grid_problem((1, 1, 1, 1)) is not None


class _Kernel:
    """Stands in for a Triton kernel: records what launch() hands it."""

    __name__ = "_stand_in"

    def __init__(self, guards=None):
        self.launched, self.guards, self.under = [], guards, []

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.launched.append((grid, args, meta))
            self.under.append(list(self.guards or []))

        return run


def test_launch_refuses_a_grid_over_the_limit_before_launching():
    kernel = _Kernel()
    with pytest.raises(ValueError, match=r"_stand_in: 65,536 programs along grid axis y, over CUDA's limit"):
        _triton.launch(kernel, (2, 65536), torch.zeros(1))
    assert kernel.launched == []
    _triton.launch(kernel, (3, 4), torch.zeros(1), BLOCK=8)
    assert kernel.launched[0][0] == (3, 4) and kernel.launched[0][2] == {"BLOCK": 8}


def test_launch_checks_an_autotuned_kernels_grid_for_the_config_it_picks():
    kernel = _Kernel()
    _triton.launch(kernel, lambda meta: (2, 70000 // meta["BLOCK"]), torch.zeros(1))
    grid_of = kernel.launched[0][0]
    assert grid_of({"BLOCK": 2}) == (2, 35000)
    with pytest.raises(ValueError, match="axis y"):
        grid_of({"BLOCK": 1})


def test_the_device_guard_makes_the_tensors_cuda_device_current(monkeypatch):
    """Triton launches on the current device: a tensor on cuda:1 while cuda:0 is current
    enters cuda:1 for the launch (torch.cuda.device stood in for, on a CPU)."""
    entered = []

    @contextlib.contextmanager
    def device(d):
        entered.append(torch.device(d))
        yield

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", device)
    with _triton.device_guard(torch.device("cuda", 1)) as current:
        assert current == torch.device("cuda", 1)
    assert entered == [torch.device("cuda", 1)]
    with _triton.device_guard(torch.device("cuda", 0)) as current:  # already current: nothing to switch
        assert current == torch.device("cuda", 0)
    assert len(entered) == 1
    with _triton.device_guard(torch.device("cpu")) as current:
        assert current is None


def test_launch_runs_the_kernel_inside_the_device_guard_of_its_tensors(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def guard(device):
        entered.append(device)
        yield device
        entered.pop()

    monkeypatch.setattr(_triton, "device_guard", guard)
    kernel = _Kernel(entered)
    _triton.launch(kernel, (1,), 3, torch.zeros(2, device="meta"))
    assert kernel.under == [[torch.device("meta")]] and entered == []


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_attention_over_axis_ys_limit_runs_in_batch_slices_and_computes_the_same(monkeypatch, kv_heads):
    """With axis y's limit stood in at 8 programs, batch 3 x 4 heads runs each kernel in
    batch slices (2 elements per launch for 4 heads, 1 for q + k heads): the result, forward
    and every gradient, is the reference's under the tolerance rule."""
    import trm_kernels as K
    from oracle import compare
    from trm_kernels import attention
    from trm_kernels import reference as R

    monkeypatch.setattr(attention, "GRID_LIMITS", (2**31 - 1, 8, 8))
    launches, real = [], attention.launch

    def counted(kernel, grid, *args, **meta):
        launches.append(grid)
        real(kernel, grid, *args, **meta)

    monkeypatch.setattr(attention, "launch", counted)
    heads, d, seq = 4, 32, 11
    qkv = torch.randn(3, seq, (heads + 2 * kv_heads) * d)
    cos, sin = K.rope_cos_sin(seq, d)
    mask = torch.arange(seq) < torch.tensor([11, 7, 9])[:, None]
    compare(lambda q: K.rope_attention(q, cos, sin, heads, "triton", num_kv_heads=kv_heads, causal=True, key_mask=mask),
            lambda q: R.rope_attention(q, cos, sin, heads, kv_heads, True, mask), [qkv], "sliced")  # fmt: skip
    assert all(grid[1] <= 8 for grid in launches) and len(launches) >= 10


def test_a_sequence_axis_norm_over_axis_ys_limit_is_not_taken_by_the_triton_kernel(monkeypatch):
    """The sequence-axis norm puts the batch on axis y: past its limit `auto` runs the
    reference, and the triton backend refuses at launch, naming the limit."""
    import trm_kernels as K
    from trm_kernels import rmsnorm

    x = torch.randn(4, 6, 8)
    assert rmsnorm.supports(x, x, 1, 1e-5) and rmsnorm.supports(x, x, -1, 1e-5)
    monkeypatch.setattr(rmsnorm, "GRID_LIMITS", (2**31 - 1, 3, 3))
    assert not rmsnorm.supports(x, x, 1, 1e-5) and rmsnorm.supports(x, x, -1, 1e-5)
    monkeypatch.setattr(_triton, "GRID_LIMITS", (2**31 - 1, 3, 3))
    with pytest.raises(ValueError, match="4 programs along grid axis y"):
        K.add_rmsnorm(x, x, 1, backend="triton")


def test_an_mlp_t_batch_over_axis_ys_limit_is_not_taken_by_the_triton_backend():
    """The mlp_t kernel and its composition's sequence-axis norm put the batch on axis y."""
    from trm_kernels import token_mlp

    weights, row = (torch.empty(1024, 97), torch.empty(97, 512)), torch.empty(1, 97, 8)  # (the interpreter's CPU)
    assert token_mlp.supports(row.expand(65535, 97, 8), *weights, 1e-5)
    assert not token_mlp.supports(row.expand(65536, 97, 8), *weights, 1e-5)
