"""Every kernel launch of the fused ops at the largest shapes users run, planned on any
machine and held against CUDA's launch limits.

    python -m trm_benchmarks.launches                     # a table per case; exit 1 if a launch breaks a limit
    python -m trm_benchmarks.launches --json              # every launch recorded
    python -m trm_benchmarks.launches --capability 86     # as on another GPU (default: 90, Hopper)

The Triton interpreter runs any grid and a CPU has one device, so neither shows what a GPU
refuses. Here every op runs forward and backward on meta tensors (shapes of any size, no
memory), planned as on a GPU of the given compute capability (``trm_kernels._triton.STAND_IN``:
that GPU's tiles, shared memory budget and autotuned configs), and Triton's launcher is
replaced by a recorder that runs nothing. Each launch records its kernel, its grid (for an
autotuned kernel, the grid of every config it may pick) and the device that
``trm_kernels._triton.launch`` made current; every one is checked against CUDA's limits
(grid axis x < 2^31, y and z <= 65,535) and for running under its tensors' device. Each op
runs twice: with the fused kernels (``TRM_TUNE=off``) and with the compositions the timing
may choose instead (``composed``). Run it without TRITON_INTERPRET: the kernels as a GPU
launches them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator

import torch


@dataclasses.dataclass
class Launch:
    case: str
    kernel: str
    grid: tuple[int, ...]
    config: str  # the autotuner config the grid is for ("" for a direct launch)
    devices: list[str]  # of the launch's tensors
    current: str | None  # the device launch() made current (None: no guard entered)

    def problem(self) -> str | None:
        from trm_kernels._triton import grid_problem

        if (problem := grid_problem(self.grid)) is not None:
            return problem
        if len(set(self.devices)) != 1:
            return f"tensors on several devices: {sorted(set(self.devices))}"
        if self.current != self.devices[0]:
            return f"launched with {self.current} current, tensors on {self.devices[0]}"
        return None


@dataclasses.dataclass
class Recorder:
    launches: list[Launch] = dataclasses.field(default_factory=list)
    case: str = ""  # what the launches recorded from now on belong to


@contextlib.contextmanager
def recording(capability: int) -> Iterator[Recorder]:
    """Launches are recorded, not run, and the package plans as on a GPU of `capability`."""
    import torch._library.custom_ops as custom_ops
    import triton.runtime.autotuner as autotuner
    import triton.runtime.jit as jit
    import trm_kernels._triton as T
    from trm_kernels import arch

    recorder = Recorder()
    entered: list = []

    @contextlib.contextmanager
    def guard(device):  # stands in for the CUDA device guard: records what launch() makes current
        entered.append(device)
        try:
            yield device
        finally:
            entered.pop()

    def record(kernel, args, kwargs, grids):
        devices = [str(a.device) for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        current = str(entered[-1]) if entered and entered[-1] is not None else None
        for config, grid in grids:
            recorder.launches.append(Launch(recorder.case, kernel, tuple(int(n) for n in grid), config, devices,
                                            current))  # fmt: skip

    def jit_run(self, *args, grid, warmup, **kwargs):
        record(self.__name__, args, kwargs, [("", grid(kwargs) if callable(grid) else grid)])

    def tuned_run(self, *args, grid, warmup=False, **kwargs):
        grids = [(str(c), grid({**kwargs, **c.all_kwargs()}) if callable(grid) else grid) for c in self.configs]
        record(self.base_fn.__name__, args, kwargs, grids)

    ops = [op for name, op in list(custom_ops.OPDEFS.items()) if name.startswith("trm::")]
    fakes = {op: op._abstract_fn for op in ops}
    saved = (jit.JITFunction.run, autotuner.Autotuner.run, T.device_guard, T.STAND_IN)
    try:
        for op in ops:  # meta tensors run the real implementation, whose launches are recorded
            op._abstract_fn = op._init_fn
        jit.JITFunction.run, autotuner.Autotuner.run, T.device_guard = jit_run, tuned_run, guard
        T.STAND_IN = (capability, arch.ARCHS[capability].shared_per_block)
        yield recorder
    finally:
        jit.JITFunction.run, autotuner.Autotuner.run, T.device_guard, T.STAND_IN = saved
        for op, fake in fakes.items():
            op._abstract_fn = fake


def _meta(*shape, dtype=None, grad=True):
    """An empty meta tensor: bf16 (or the case's dtype, DTYPE), or `dtype`."""
    return torch.empty(*shape, device="meta", dtype=dtype or DTYPE[0], requires_grad=grad)


def _tables(seq: int, head_dim: int):
    return tuple(_meta(seq, head_dim, dtype=torch.float32, grad=False) for _ in range(2))


DTYPE = [torch.bfloat16]  # the floating dtype of the case being planned


def _backward(*outs) -> None:
    total = sum(o.float().sum() for o in outs)
    total.backward(torch.ones((), device="meta"))


def _recursive_block(batch: int, seq: int, hidden: int, heads: int, inter: int, vocab: int) -> None:
    """TRM's net at these sizes, every fused op forward and backward (attention variant)."""
    import trm_kernels as K

    h, a, b = _meta(batch, seq, hidden), _meta(batch, seq, hidden), _meta(batch, seq, hidden)
    x = K.inject(h, a, b, backend="triton")
    cos, sin = _tables(seq, hidden // heads)
    attn = K.rope_attention(_meta(batch, seq, 3 * hidden), cos, sin, heads, backend="triton")
    x = K.linear_add_rmsnorm(attn, _meta(hidden, hidden), x, 1e-5, backend="triton")
    x = K.swiglu_mlp_rmsnorm(x, _meta(2 * inter, hidden), _meta(hidden, inter), 1e-5, backend="triton")
    y = K.add_rmsnorm(_meta(batch, seq, hidden), x, backend="triton")
    m = K.swiglu_mlp(y, _meta(2 * inter, hidden), _meta(hidden, inter), backend="triton")
    g = K.swiglu(_meta(batch, seq, 2 * inter), backend="triton")
    labels = _meta(batch, seq, dtype=torch.int64, grad=False)
    logits = _meta(batch, seq, vocab)
    losses = (K.stablemax_cross_entropy(logits, labels, backend="triton"),
              K.softmax_cross_entropy(logits, labels, backend="triton"))  # fmt: skip
    _backward(m, g, *losses)


def _token_mixer(batch: int, seq: int, hidden: int, inter: int) -> None:
    import trm_kernels as K

    out = K.token_mlp_rmsnorm(_meta(batch, seq, hidden), _meta(2 * inter, seq), _meta(seq, inter), 1e-5,
                              backend="triton")  # fmt: skip
    _backward(out)


def _one_kernel_sublayer(rows: int, hidden: int, inter: int) -> None:
    """The no-grad candidate the timing may choose for the channel MLP sub-layer."""
    from trm_kernels import channel_mlp

    channel_mlp.sublayer_one_kernel(_meta(rows, hidden, grad=False), _meta(2 * inter, hidden, grad=False),
                                    _meta(hidden, inter, grad=False), 1e-5)  # fmt: skip


def _recurrent_depth_adapter(batch: int, seq: int, hidden: int) -> None:
    """A recurrent-depth LM's adapter on cat([state, embeds]) (Huginn's), forward and backward."""
    import trm_kernels as K

    out = K.concat_linear(_meta(batch, seq, hidden), _meta(batch, seq, hidden), _meta(hidden, 2 * hidden),
                          _meta(hidden), backend="triton")  # fmt: skip
    _backward(out)


def _sandwich_block(batch: int, seq: int, hidden: int, inter: int) -> None:
    """A Huginn-style sandwich block's norms (fp32 weights, eps 1e-6): the attention's closing
    norm and the MLP's opening one as one sandwich_rmsnorm, then the MLP's down projection with
    its weighted post-norm (linear_add_rmsnorm: above hidden 512, cuBLAS + the add + RMSNorm kernel)."""
    import trm_kernels as K

    fp32 = torch.float32
    stream, mlp_in = K.sandwich_rmsnorm(_meta(batch, seq, hidden), _meta(batch, seq, hidden), _meta(hidden, dtype=fp32),
                                        _meta(hidden, dtype=fp32), 1e-6, backend="triton")  # fmt: skip
    out = K.linear_add_rmsnorm(_meta(batch, seq, inter), _meta(hidden, inter), stream, 1e-6, backend="triton",
                               weight=_meta(hidden, dtype=fp32))  # fmt: skip
    _backward(mlp_in, out)


def _language_model(batch: int, seq: int, hidden: int, heads: int, kv_heads: int, inter: int, vocab: int,
                    qk_norm: str | None = None) -> None:  # fmt: skip
    """A causal grouped-query decoder layer (head size 128), pre-norm with learnable weights
    (and with `qk_norm`, Qwen3's QK-norm: weights [d] on q and k)."""
    import trm_kernels as K

    d = hidden // heads
    mask = _meta(batch, seq, dtype=torch.bool, grad=False)
    norm = dict(qk_norm=qk_norm, q_norm_weight=_meta(d, dtype=torch.float32), k_norm_weight=_meta(d)) if qk_norm else {}
    attn = K.rope_attention(_meta(batch, seq, (heads + 2 * kv_heads) * d), *_tables(seq, d), heads, backend="triton",
                            num_kv_heads=kv_heads, causal=True, key_mask=mask, **norm)  # fmt: skip
    fp32 = torch.float32  # the residual stream and the norm's weight
    stream, normed = K.add_rmsnorm(_meta(batch, seq, hidden), _meta(batch, seq, hidden, dtype=fp32),
                                   weight=_meta(hidden, dtype=fp32), prenorm=True, backend="triton")  # fmt: skip
    mlp = K.swiglu_mlp(normed, _meta(2 * inter, hidden), _meta(hidden, inter), backend="triton")
    out = K.linear_add_rmsnorm(mlp, _meta(hidden, hidden), _meta(batch, seq, hidden), 1e-5, backend="triton")
    loss = K.softmax_cross_entropy(_meta(batch, seq, vocab), _meta(batch, seq, dtype=torch.int64, grad=False),
                                   backend="triton")  # fmt: skip
    _backward(attn, stream, out, loss)


def _cached_attention(batch: int, seq: int, capacity: int, heads: int, kv_heads: int, d: int,
                      qk_norm: str | None = None) -> None:  # fmt: skip
    """A language model's generation step: `seq` new tokens per sequence against a cache (decode: 1)."""
    import trm_kernels as K

    caches = [_meta(batch, capacity, kv_heads, d, grad=False) for _ in range(2)]
    lens = _meta(batch, dtype=torch.int32, grad=False)
    K.kv_cache_attention(_meta(batch, seq, (heads + 2 * kv_heads) * d, grad=False), *caches, lens,
                         *_tables(capacity, d), heads, backend="triton", num_kv_heads=kv_heads,
                         qk_norm=qk_norm)  # fmt: skip


def _in(dtype: torch.dtype, run: Callable, *sizes: int) -> None:
    """`run(*sizes)` with tensors of `dtype` (fp32 on a GPU takes other tiles and paths)."""
    DTYPE[0] = dtype
    try:
        run(*sizes)
    finally:
        DTYPE[0] = torch.bfloat16


def cases() -> dict[str, Callable[[], None]]:
    """The shapes users run at their largest: TRM's attention and mlp_t nets at batch 4096 and
    8192 (S = 97, Sudoku; in bf16, and in fp32 at 8192), the maze's batch 1536 x S 916, and a language model's 8 x 4096
    tokens at hidden 4096 with 32 query and 8 key/value heads of 128."""
    return {
        "sudoku-att batch 4096": lambda: _recursive_block(4096, 97, 512, 8, 1536, 11),
        "sudoku-att batch 8192": lambda: _recursive_block(8192, 97, 512, 8, 1536, 11),
        "sudoku-att batch 8192, fp32": lambda: _in(torch.float32, _recursive_block, 8192, 97, 512, 8, 1536, 11),
        "sudoku-mlp batch 8192, fp32": lambda: _in(torch.float32, _token_mixer, 8192, 97, 512, 512),
        "sudoku-mlp batch 4096": lambda: _token_mixer(4096, 97, 512, 512),
        "sudoku-mlp batch 8192": lambda: _token_mixer(8192, 97, 512, 512),
        "maze batch 1536 x 916": lambda: _recursive_block(1536, 916, 512, 8, 1536, 6),
        "maze mlp_t batch 1536 x 916": lambda: _token_mixer(1536, 916, 512, 1536),
        "one-kernel sub-layer, maze rows": lambda: _one_kernel_sublayer(1536 * 916, 512, 1536),
        "LM 8 x 4096, hidden 4096, 32/8 heads": lambda: _language_model(8, 4096, 4096, 32, 8, 14336, 8192),
        "LM 8 x 4096, QK-norm before RoPE (Qwen3)": lambda: _language_model(
            8, 4096, 4096, 32, 8, 14336, 8192, "before"
        ),
        "sandwich block 8 x 4096, hidden 5280": lambda: _sandwich_block(8, 4096, 5280, 17920),
        "recurrent-depth adapter 8 x 4096, hidden 5280": lambda: _recurrent_depth_adapter(8, 4096, 5280),
        "LM decode, batch 16384, cache 4096, 32/8 heads": lambda: _cached_attention(16384, 1, 4096, 32, 8, 128),
        "LM decode, batch 1, cache 131072, 32/8 heads": lambda: _cached_attention(1, 1, 131072, 32, 8, 128),
        "LM decode, batch 16384, QK-norm after RoPE": lambda: _cached_attention(16384, 1, 4096, 32, 8, 128, "after"),
        "LM prefill chunk 8 x 2048, cache 8192, 32/8 heads": lambda: _cached_attention(8, 2048, 8192, 32, 8, 128),
    }


def plan(capability: int = 90, names: list[str] | None = None) -> list[Launch]:
    """Every launch of every case (both timing modes), recorded as on a GPU of `capability`."""
    from trm_kernels import tune

    with recording(capability) as recorder:
        for name, run in cases().items():
            if names and name not in names:
                continue
            for mode in ("off", "composed"):
                recorder.case = f"{name} ({'fused' if mode == 'off' else 'composed'})"
                with tune.use_mode(mode):
                    run()
    return recorder.launches


def main(argv: list[str] | None = None) -> int:
    from trm_kernels import arch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capability", type=int, default=90, choices=sorted(arch.ARCHS),
                        help="plan as on this GPU generation (compute capability; default %(default)s)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="every launch as JSON on stdout")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.exit(2, "error: trm_benchmarks.launches plans GPU launches: run it without TRITON_INTERPRET=1\n")
    launches = plan(args.capability)
    problems = [(launch, p) for launch in launches if (p := launch.problem()) is not None]
    if args.json:
        print(json.dumps([dataclasses.asdict(launch) | {"problem": launch.problem()} for launch in launches], indent=1))
    else:
        for case in dict.fromkeys(launch.case for launch in launches):
            rows = [launch for launch in launches if launch.case == case]
            widest = max(rows, key=lambda launch: max(launch.grid[1:], default=0))
            print(f"{case}: {len(rows)} launches, largest grid {max(max(r.grid) for r in rows):,} programs "
                  f"(axis x), largest on y {max(widest.grid[1:], default=0):,}")  # fmt: skip
        for launch, problem in problems:
            print(f"  {launch.case}: {launch.kernel} grid {launch.grid} {launch.config}: {problem}")
        print(
            f"{len(launches)} launches planned as on sm_{args.capability}, {len(problems)} over a limit",
            file=sys.stderr,
        )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
