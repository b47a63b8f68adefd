"""The CUDA extension and CUDA graphs: run only where a GPU is (tests/oracle.py's rule)."""

import pytest
import torch
import trm_kernels as K
from oracle import compare
from trm_kernels import reference as R

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def test_extension_builds_or_loads():
    from trm_kernels.cuda_ext import load

    assert load() is not None, "the CUDA extension could not be built; see the warning"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, hidden", [(1, 512), (768 * 97, 512), (3, 37), (5, 1000), (2, 4096), (2, 8192)])
@pytest.mark.parametrize("residual", [True, False])
def test_cuda_add_rmsnorm(dtype, rows, hidden, residual):
    x, r = (torch.randn(rows, hidden, device="cuda").to(dtype) for _ in range(2))
    if residual:
        compare(lambda a, b: K.add_rmsnorm(a, b, backend="cuda"), R.add_rmsnorm, [x, r], f"cuda {rows}x{hidden}")
    else:
        compare(lambda a: K.add_rmsnorm(a, backend="cuda"), R.add_rmsnorm, [x], f"cuda {rows}x{hidden}")


def test_cuda_backend_on_an_unaligned_view_and_other_axes():
    x = torch.randn(4, 513, device="cuda", dtype=torch.bfloat16)[:, 1:]  # rows start 2 bytes off alignment
    compare(lambda a: K.add_rmsnorm(a, backend="cuda"), R.add_rmsnorm, [x], "unaligned")
    y = torch.randn(2, 97, 64, device="cuda", dtype=torch.bfloat16)
    compare(lambda a: K.add_rmsnorm(a, dim=1, backend="cuda"), lambda a: R.add_rmsnorm(a, dim=1), [y], "seq axis")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_fused_ops_replay_in_a_cuda_graph(backend):
    """Capture a block of fused ops once, replay on new inputs copied into the static ones."""
    h, a, r = (torch.randn(8, 97, 512, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    gu = torch.randn(8, 97, 3072, device="cuda", dtype=torch.bfloat16)
    qkv = torch.randn(8, 97, 1536, device="cuda", dtype=torch.bfloat16)
    cos, sin = (t.cuda() for t in K.rope_cos_sin(97, 64))

    def block():
        x = K.inject(h, a, backend="triton")
        x = K.add_rmsnorm(x, r, backend=backend)
        x = K.add_rmsnorm(x, K.rope_attention(qkv, cos, sin, 8, backend="triton"), backend=backend)
        return x + K.swiglu(gu, backend="triton")[..., :512]

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        block()  # JIT compilation and extension loading happen outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = block()
    for t in (h, a, r, gu, qkv):
        t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    want = R.add_rmsnorm(R.add_rmsnorm(R.inject(h, a), r), R.rope_attention(qkv, cos, sin, 8)) + R.swiglu(gu)[..., :512]
    torch.testing.assert_close(out.float(), want.float(), atol=6e-2, rtol=2e-2)
