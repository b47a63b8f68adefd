"""``trm doctor``: what this machine runs, and whether every fused op matches the reference here.

One report a user can attach to a bug: the environment; every op on every backend available
here, in fp32, fp16 and bf16 where supported, at TRM's shapes and awkward ones, forward and
backward, each error against the reference and float64 under the package's tolerance rule
(``trm_kernels.verify``); a small TRM training and evaluation step through the CUDA-graph
path against eager (on a CPU nothing is captured: the static-buffer path the graphs replay
runs, and is reported as such); and on a GPU the speed of each op, fused against eager. Written as
``doctor.json`` and ``doctor.md``; failures are listed first. On a CPU the Triton kernels
run in the interpreter (a child process with ``TRITON_INTERPRET=1``), and speed is not
measured.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import trm_kernels as K
from trm_kernels import arch, backend, tune, verify
from trm_kernels.verify import relative_error, run_op, tolerance_problem

from .arch import build_model
from .config import ModelConfig, preset
from .losses import act_loss

STATIC_BUFFERS = "static buffers vs eager"  # the backend of the graphs checks on a CPU, where nothing is captured


@dataclass
class Check:
    kind: str  # parity | graphs | speed | choice (a candidate kept by timing, trm_kernels.tune)
    name: str
    backend: str
    dtype: str
    shape: str
    passed: bool | None  # None: measured, nothing to pass (speed)
    detail: str
    numbers: dict = field(default_factory=dict)


def environment() -> dict:
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "numpy": np.__version__,
        "triton": _version("triton"),
        "triton_interpreter": os.environ.get("TRITON_INTERPRET") == "1",
        "settings": {k: v for k, v in os.environ.items() if k.startswith("TRM_")},
        "backend": K.get_backend(),
        "verify": K.get_verify(),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env |= {"device": p.name, "compute_capability": f"{p.major}.{p.minor}", "sm_count": p.multi_processor_count,
                "memory_gib": round(p.total_memory / 2**30, 1),
                "driver": _driver(), "static_verification": static_verification(10 * p.major + p.minor)}  # fmt: skip
    else:
        env["device"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    env["cuda_extension"] = _extension()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env["auto_order"] = {op: [b for b in backend.AUTO_ORDER.get(device, ()) if b in K.available(op)]
                         for op in backend._REGISTRY}  # fmt: skip
    return env


def static_verification(capability: int) -> str:
    """What CI's ahead-of-time compilation (trm_benchmarks.ptx) says about this architecture."""
    listed = arch.nearest(capability)
    target = f"sm_{capability}"
    if listed is None:
        listed_targets = ", ".join(a.target for a in arch.ARCHS.values())
        return f"{target} is not among the architectures CI compiles for ({listed_targets})"
    if listed.capability == capability:
        return f"{target}: every Triton kernel compiled and checked against its limits in CI"
    return f"{target}: not compiled in CI; {listed.target} stands for it (same major version)"


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)  # fmt: skip
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _extension() -> str:
    """How trm_kernels._C was obtained, or why not."""
    try:
        from trm_kernels import _C  # noqa: F401

        return "built by the install (trm_kernels._C)"
    except ImportError:
        pass
    if torch.version.cuda is None:
        return "not built: this torch has no CUDA (the cuda backend is unavailable)"
    if not torch.cuda.is_available():
        return "not built: no GPU visible"
    from trm_kernels import cuda_ext

    return "JIT-built on first use" if cuda_ext.load() is not None else "unavailable (see the warning); Triton runs"


# ---- parity ----------------------------------------------------------------------------------


def _cases(device: torch.device, quick: bool) -> list[tuple[str, str, Callable[[torch.dtype], tuple]]]:
    """(op, shape label, make(dtype) -> args) at TRM shapes and awkward ones."""

    def rand(*shape, scale=1.0):
        return lambda dt: (torch.randn(*shape, device=device) * scale).to(dt)

    def args(*makers):
        return lambda dt: tuple(m(dt) if callable(m) else m for m in makers)

    # TRM's shapes (hidden 512, S = 97, head_dim 64, the mlp_t sizes); --quick keeps S = 97 and
    # shrinks the rest, so that a CPU runs it in the interpreter in a few minutes
    batch, d, heads, hd, inter, wide = (2, 64, 2, 32, 64, 96) if quick else (8, 512, 8, 64, 512, 3072)
    cos, sin = K.rope_cos_sin(97, hd)
    cos_odd, sin_odd = K.rope_cos_sin(13, 32)
    logits_labels = lambda b, s, v: lambda dt: (torch.randn(b, s, v, device=device).to(dt),  # noqa: E731
                                                torch.randint(0, v, (b, s), device=device))  # fmt: skip
    trm = f"[{batch}, 97, {d}]"
    fp32 = lambda *shape: lambda dt: torch.randn(*shape, device=device)  # noqa: E731  (stays fp32)
    mask = torch.arange(40, device=device) < torch.tensor([[40], [29]], device=device)  # lengths 40 and 29
    cos_96, sin_96 = (t.to(device) for t in K.rope_cos_sin(40, 96))
    cos_50, sin_50 = (t.to(device) for t in K.rope_cos_sin(50, 64))
    lens_decode = torch.tensor([0, 17, 49], dtype=torch.int32, device=device)  # an empty cache and a full one
    lens_chunk = torch.tensor([3, 21], dtype=torch.int32, device=device)
    cases = [
        ("add_rmsnorm", f"{trm}, hidden", args(rand(batch, 97, d), rand(batch, 97, d), -1, 1e-5)),
        ("add_rmsnorm", f"{trm}, sequence", args(rand(batch, 97, d), rand(batch, 97, d), -2, 1e-5)),
        ("add_rmsnorm", "[3, 7, 33], hidden", args(rand(3, 7, 33), rand(3, 7, 33), -1, 1e-5)),
        ("add_rmsnorm", f"{trm}, hidden, weight", args(rand(batch, 97, d), rand(batch, 97, d), -1, 1e-5,
                                                       fp32(d))),
        ("add_rmsnorm", f"{trm}, pre-norm, fp32 stream, weight",
         args(rand(batch, 97, d), fp32(batch, 97, d), -1, 1e-5, fp32(d), True)),
        ("inject", trm, args(rand(batch, 97, d), rand(batch, 97, d), rand(batch, 97, d))),
        ("inject", f"{trm}, [{batch}, 1, {d}] broadcast",
         args(rand(batch, 97, d), rand(batch, 1, d), rand(batch, 97, d))),
        ("swiglu", f"[{batch}, 97, {wide}]", args(rand(batch, 97, wide), -1)),
        ("swiglu", f"[{batch}, {2 * inter}, {d}], sequence", args(rand(batch, 2 * inter, d), -2)),
        ("swiglu", "[3, 5, 18]", args(rand(3, 5, 18), -1)),
        ("swiglu", "[3, 5, 18], geglu (Gemma)", args(rand(3, 5, 18), -1, "geglu")),
        ("swiglu_mlp", f"{trm}, I {3 * d}", args(rand(batch, 97, d), rand(6 * d, d, scale=d**-0.5),
                                                 rand(d, 3 * d, scale=(3 * d) ** -0.5))),
        ("swiglu_mlp", "[3, 7, 33], I 17", args(rand(3, 7, 33), rand(34, 33, scale=33**-0.5),
                                                rand(33, 17, scale=17**-0.5))),
        ("swiglu_mlp", "[3, 7, 33], I 17, geglu (Gemma)", args(rand(3, 7, 33), rand(34, 33, scale=33**-0.5),
                                                               rand(33, 17, scale=17**-0.5), "geglu")),
        ("swiglu_mlp", "[3, 7, 33], I 17, relu2 (Primer, Nemotron)",
         args(rand(3, 7, 33), rand(17, 33, scale=33**-0.5), rand(33, 17, scale=17**-0.5), "relu2")),
        ("swiglu_mlp_rmsnorm", "[3, 7, 40], I 24, geglu",
         args(rand(3, 7, 40), rand(48, 40, scale=40**-0.5), rand(40, 24, scale=24**-0.5), 1e-5, None, "geglu")),
        ("swiglu_mlp_rmsnorm", "[3, 7, 40], I 24, relu2",
         args(rand(3, 7, 40), rand(24, 40, scale=40**-0.5), rand(40, 24, scale=24**-0.5), 1e-5, None, "relu2")),
        ("swiglu_mlp_rmsnorm", f"{trm}, I {3 * d}", args(rand(batch, 97, d), rand(6 * d, d, scale=d**-0.5),
                                                         rand(d, 3 * d, scale=(3 * d) ** -0.5), 1e-5)),
        ("swiglu_mlp_rmsnorm", "[3, 7, 600], I 40 (hidden above the norm epilogue's 512)",
         args(rand(3, 7, 600), rand(80, 600, scale=600**-0.5), rand(600, 40, scale=40**-0.5), 1e-5)),
        ("linear_add_rmsnorm", f"{trm} @ [{d}, {d}] (o_proj)", args(rand(batch, 97, d), rand(d, d, scale=d**-0.5),
                                                                  rand(batch, 97, d), 1e-5)),
        ("linear_add_rmsnorm", "[3, 7, 33] @ [20, 33]", args(rand(3, 7, 33), rand(20, 33, scale=33**-0.5),
                                                             rand(3, 7, 20), 1e-5)),
        ("swiglu_mlp_rmsnorm", "[3, 7, 40], I 24, fp32 norm weight, eps 1e-6",
         args(rand(3, 7, 40), rand(48, 40, scale=40**-0.5), rand(40, 24, scale=24**-0.5), 1e-6, fp32(40))),
        ("linear_add_rmsnorm", "[2, 3, 16] @ [2048, 16], fp32 norm weight, eps 1e-6 (above the epilogue's 512)",
         args(rand(2, 3, 16), rand(2048, 16, scale=0.25), rand(2, 3, 2048), 1e-6, fp32(2048))),
        ("sandwich_rmsnorm", f"{trm}, fp32 weights", args(rand(batch, 97, d), rand(batch, 97, d), fp32(d), fp32(d),
                                                          1e-5)),
        ("sandwich_rmsnorm", "[3, 7, 100], eps 1e-6", args(rand(3, 7, 100), rand(3, 7, 100), fp32(100), fp32(100),
                                                           1e-6)),
        ("concat_linear", "cat([3, 7, 33], [3, 7, 20]) @ [24, 53] + bias",
         args(rand(3, 7, 33), rand(3, 7, 20), rand(24, 53, scale=53**-0.5), rand(24))),
        ("token_mlp_rmsnorm", f"{trm}, I {inter}",
         args(rand(batch, 97, d), rand(2 * inter, 97, scale=97**-0.5), rand(97, inter, scale=inter**-0.5), 1e-5)),
        ("token_mlp_rmsnorm", "[2, 13, 40], I 24",
         args(rand(2, 13, 40), rand(48, 13, scale=13**-0.5), rand(13, 24, scale=24**-0.5), 1e-5)),
        ("token_mlp_rmsnorm", "[2, 150, 72], I 80 (the 256-row sequence tile)",
         args(rand(2, 150, 72), rand(160, 150, scale=150**-0.5), rand(150, 80, scale=80**-0.5), 1e-5)),
        ("rope_attention", f"[{batch}, 97, {heads}x{hd}]",
         args(rand(batch, 97, 3 * heads * hd), cos.to(device), sin.to(device), heads)),
        ("rope_attention", "[2, 13, 2x32]", args(rand(2, 13, 3 * 64), cos_odd.to(device), sin_odd.to(device), 2)),
        ("rope_attention", "[2, 40, 4x96], 2 kv heads, causal, key mask, RoPE",
         args(rand(2, 40, 8 * 96), cos_96, sin_96, 4, 2, True, mask)),
        ("rope_attention", "[2, 40, 4x32], 1 kv head, no RoPE", args(rand(2, 40, 6 * 32), None, None, 4, 1)),
        ("rope_attention", "[2, 13, 2x32], interleaved RoPE",
         args(rand(2, 13, 3 * 64), *(t.to(device) for t in K.rope_cos_sin(13, 32, rope="interleaved")), 2, 2, True,
              None, "interleaved")),
        ("rope_attention", "[2, 40, 4x96], 2 kv heads, causal, QK-norm before RoPE (Qwen3), fp32 weights",
         args(rand(2, 40, 8 * 96), cos_96, sin_96, 4, 2, True, None, "rotate_half", 0, fp32(96), fp32(96), "before",
              1e-6)),
        ("rope_attention", "[2, 13, 2x32], interleaved RoPE, QK-norm after it, no weights",
         args(rand(2, 13, 3 * 64), *(t.to(device) for t in K.rope_cos_sin(13, 32, rope="interleaved")), 2, 2, True,
              None, "interleaved", 0, None, None, "after", 1e-5)),
        ("kv_cache_attention", "decode [3, 1, 4x64] against caches of 50, QK-norm before RoPE",
         args(rand(3, 1, 8 * 64), rand(3, 50, 2, 64), rand(3, 50, 2, 64), lens_decode, cos_50, sin_50, 4, 2, True,
              "rotate_half", 0, fp32(64), fp32(64), "before", 1e-6)),
        ("kv_cache_attention", "prefill chunk [2, 9, 4x32], interleaved, QK-norm after RoPE at each offset",
         args(rand(2, 9, 6 * 32), rand(2, 30, 1, 32), rand(2, 30, 1, 32), lens_chunk,
              *(t.to(device) for t in K.rope_cos_sin(30, 32, rope="interleaved")), 4, 1, True, "interleaved", 0,
              fp32(32), fp32(32), "after", 1e-6)),
        ("kv_cache_attention", "decode [3, 1, 4x64] against caches of 50, 2 kv heads",
         args(rand(3, 1, 8 * 64), rand(3, 50, 2, 64), rand(3, 50, 2, 64), lens_decode, cos_50, sin_50, 4, 2, True,
              "rotate_half", 0)),
        ("kv_cache_attention", "prefill chunk [2, 9, 4x32], 1 kv head, interleaved, window 5",
         args(rand(2, 9, 6 * 32), rand(2, 30, 1, 32), rand(2, 30, 1, 32), lens_chunk,
              *(t.to(device) for t in K.rope_cos_sin(30, 32, rope="interleaved")), 4, 1, True, "interleaved", 5)),
        ("stablemax_cross_entropy", f"[{batch}, 97, 11]", lambda dt: (*logits_labels(batch, 97, 11)(dt), -100)),
        ("softmax_cross_entropy", f"[{batch}, 97, 11]", lambda dt: (*logits_labels(batch, 97, 11)(dt), -100)),
    ]  # fmt: skip
    if not quick:
        cos_l, sin_l = K.rope_cos_sin(916, 64)
        cases.append(("rope_attention", "[2, 916, 8x64]",
                      args(rand(2, 916, 3 * 512), cos_l.to(device), sin_l.to(device), 8)))  # fmt: skip
    return cases


def _dtypes(device: torch.device) -> list[torch.dtype]:
    if device.type == "cuda":
        return [torch.float32, torch.float16, torch.bfloat16]
    return [torch.float32, torch.float16]  # the interpreter's types; bf16 needs a GPU


def _run(op: str, backend_name: str, args: tuple):
    """Output and the gradients of the activations and learnable weights (not of tables like
    cos/sin) of one op call; `args` are the op's parameters in order (verify.PARAMETERS)."""
    grad_of = [(i in verify.BATCHED[op] or i in verify.WEIGHTS.get(op, ())) and isinstance(a, torch.Tensor)
               and a.is_floating_point() and op not in verify.FORWARD_ONLY for i, a in enumerate(args)]  # fmt: skip
    names = verify.PARAMETERS[op]
    out, grads = run_op(lambda *a: getattr(K, op)(**dict(zip(names, a, strict=False)), backend=backend_name),
                        args, grad_of)  # fmt: skip
    if any(g is None for g in grads):
        raise RuntimeError("backward left an input without a gradient")
    return out, grads


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else ""


def _compare(fused, ref, oracle) -> tuple[str | None, dict]:
    """What failed of (output, input gradients) against the reference and float64, and the errors."""
    (out, grads), (ref_out, ref_grads), (ora_out, ora_grads) = fused, ref, oracle
    outs = list(zip(verify.outputs(out), verify.outputs(ref_out), verify.outputs(ora_out), strict=True))
    problems = [tolerance_problem(f, r, o, "forward" + (f" (output {i})" if i else "")) for i, (f, r, o) in
                enumerate(outs)]  # fmt: skip
    for i, (g, r, o) in enumerate(zip(grads, ref_grads, ora_grads, strict=True)):
        problems.append(tolerance_problem(g, r, o, f"gradient {i}"))
    numbers = {
        "forward_error": max(relative_error(f, o) for f, _, o in outs),
        "reference_forward_error": max(relative_error(r, o) for _, r, o in outs),
        "gradient_errors": [relative_error(g, o) for g, o in zip(grads, ora_grads, strict=True)],
        "reference_gradient_errors": [relative_error(r, o) for r, o in zip(ref_grads, ora_grads, strict=True)],
    }
    return next((p for p in problems if p), None), numbers


def parity(device: torch.device, quick: bool, progress: Callable[[str], None]) -> list[Check]:
    checks = []
    for op, label, make in _cases(device, quick):
        for dtype in _dtypes(device):
            torch.manual_seed(0)
            args = make(dtype)
            wide = tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
            ref_out, ref_grads = _run(op, "reference", args)
            ora_out, ora_grads = _run(op, "reference", wide)
            for name in [b for b in K.available(op) if b != "reference"] + ["reference"]:
                progress(f"checking {op} {label}: {str(dtype)[6:]} {name}")
                if name == "cuda" and device.type != "cuda":
                    continue
                try:
                    problem, numbers = _compare(_run(op, name, args), (ref_out, ref_grads), (ora_out, ora_grads))
                except Exception as e:  # a kernel that cannot run here is a failed check, not a crash
                    problem, numbers = f"raised {type(e).__name__}: {_first_line(e)}", {}
                detail = (
                    problem
                    or "forward {forward_error:.2e} (reference {reference_forward_error:.2e}), "
                    "fwd+bwd within tolerance".format(**numbers)
                )
                checks.append(Check("parity", op, name, str(dtype)[6:], label, problem is None, detail, numbers))
    return checks


# ---- CUDA graphs -----------------------------------------------------------------------------


def graphs(device: torch.device, progress: Callable[[str], None]) -> list[Check]:
    """A small TRM's no-grad training cycles and evaluation step through trm.graphs against the
    same functions run directly: captured as CUDA graphs on a GPU; on a CPU nothing is captured,
    and what runs is the eager static-buffer path the graphs replay (backend STATIC_BUFFERS)."""
    captured = device.type == "cuda"
    progress("checking " + ("CUDA graphs" if captured else "the static-buffer path of the CUDA graphs")
             + ": a small TRM's training cycles and evaluation step")  # fmt: skip
    cfg = ModelConfig(vocab_size=11, seq_len=16, hidden_size=64, num_heads=2, puzzle_emb_len=1, T=3, n=2, n_sup=2)
    torch.manual_seed(0)
    model = build_model(cfg).to(device).eval()
    inputs = torch.randint(1, 11, (4, 16), device=device)
    x = model.embed(inputs, torch.zeros(4, dtype=torch.long, device=device))
    y, z = (t.contiguous() for t in model.initial_y_z(4))
    label = "captured" if captured else "no GPU: nothing captured"
    checks = []
    for step, name, direct in (("training step, no-grad cycles", "no_grad_part", model._no_grad_part),
                               ("evaluation step", "eval_step", model._eval_step)):  # fmt: skip
        try:
            want = [t.float().clone() for t in direct(x, y, z)]
            got = [t.float().clone() for t in model.graphs[name](x, y, z)]
            err = max(relative_error(g, w) for g, w in zip(got, want, strict=True))
            passed, detail = err <= 1e-2, f"largest relative difference {err:.2e} over {len(got)} outputs"
        except Exception as e:
            passed, detail, err = False, f"raised {type(e).__name__}: {_first_line(e)}", None
        checks.append(Check("graphs", step, "graphed vs eager" if captured else STATIC_BUFFERS, str(model.dtype)[6:],
                            label, passed, detail, {"relative_difference": err}))  # fmt: skip
    return checks


# ---- speed -----------------------------------------------------------------------------------


def speed(device: torch.device, quick: bool, progress: Callable[[str], None]) -> list[Check]:
    if device.type != "cuda":
        return []
    checks = []
    for op, label, make in _cases(device, quick):
        args = make(torch.bfloat16)
        for name in ["reference", *[b for b in K.available(op) if b != "reference"]]:
            progress(f"timing {op} {label}: {name}")
            fn = getattr(K, op)
            try:
                ms = _time(lambda fn=fn, name=name, args=args: fn(*args, backend=name))
            except Exception as e:
                checks.append(Check("speed", op, name, "bfloat16", label, False, f"raised {type(e).__name__}: {e}"))
                continue
            nbytes = sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))
            checks.append(Check("speed", op, name, "bfloat16", label, None,
                                f"{ms * 1e3:.1f} us, {nbytes / ms / 1e6:.0f} GB/s (inputs read once)",
                                {"ms": ms, "input_gbps": nbytes / ms / 1e6}))  # fmt: skip
    return checks + _step_speed(device, progress)


def _step_speed(device: torch.device, progress: Callable[[str], None], batch: int = 16) -> list[Check]:
    """A small-batch training step of the sudoku-mlp and sudoku-att models, reference ops
    (eager) against the fused ops (auto), CUDA graphs off in both."""
    checks = []
    for name in ("sudoku-mlp", "sudoku-att"):
        cfg = preset(name).model
        cfg.vocab_size, cfg.seq_len, cfg.cuda_graphs = 11, 81, False
        torch.manual_seed(0)
        model = build_model(cfg).to(device).train()
        data = {"inputs": torch.randint(1, 11, (batch, 81), device=device),
                "labels": torch.randint(1, 11, (batch, 81), device=device),
                "puzzle_identifiers": torch.zeros(batch, dtype=torch.long, device=device)}  # fmt: skip
        carry = model.initial_carry(data)

        def step(model=model, carry=carry, data=data):
            after, out = model(carry, data)
            loss, _ = act_loss(out, after)
            loss.backward()
            model.zero_grad()

        for backend_name in ("reference", "auto"):
            progress(f"timing a {name} training step at batch {batch}: {backend_name}")
            try:
                with K.use_backend(backend_name):
                    ms = _time(step, reps=5)
                checks.append(Check("speed", f"{name} training step", backend_name, "bfloat16", f"batch {batch}",
                                    None, f"{ms:.1f} ms", {"ms": ms}))  # fmt: skip
            except Exception as e:
                checks.append(Check("speed", f"{name} training step", backend_name, "bfloat16", f"batch {batch}",
                                    False, f"raised {type(e).__name__}: {_first_line(e)}"))  # fmt: skip
    return checks


def choices(device: torch.device, quick: bool, progress: Callable[[str], None]) -> list[Check]:
    """Where a fused GEMM kernel competes with cuBLAS + separate ops, which one ``auto`` keeps
    at TRM's shapes, with and without grad, and both timings (trm_kernels.tune); every choice
    the timing runs above made is listed too."""
    if device.type != "cuda":
        return []
    batch, d = (2, 64) if quick else (256, 512)

    def rand(*shape, scale=1.0, grad=False):
        return (torch.randn(*shape, device=device) * scale).to(torch.bfloat16).requires_grad_(grad)

    for op in ("swiglu_mlp", "swiglu_mlp_rmsnorm", "linear_add_rmsnorm", "token_mlp_rmsnorm"):
        for grad in (False, True):
            if op == "token_mlp_rmsnorm" and not grad:
                continue  # without grad the one kernel always runs
            progress(f"choosing for {op} [{batch}, 97, {d}]{' with grad' if grad else ''}")
            x = rand(batch, 97, d, grad=grad)
            if op == "linear_add_rmsnorm":  # TRM's o_proj: the heads' output [.., D] -> [.., D]
                args = (rand(batch, 97, d), rand(d, d, scale=d**-0.5), x)
            elif op == "token_mlp_rmsnorm":  # mlp_t over the 97 positions, intermediate 512
                args = (x, rand(1024, 97, scale=97**-0.5), rand(97, 512, scale=512**-0.5))
            else:
                args = (x, rand(6 * d, d, scale=d**-0.5), rand(d, 3 * d, scale=(3 * d) ** -0.5))
            try:
                getattr(K, op)(*args, backend="triton")
            except Exception as e:
                return [Check("choice", op, "triton", "bfloat16", f"[{batch}, 97, {d}]", False,
                              f"raised {type(e).__name__}: {_first_line(e)}")]  # fmt: skip
    return [
        Check("choice", c["op"], "triton", c["signature"].split("[")[0], c["signature"], None,
              ", ".join([*(f"{name} {ms:.3f} ms" for name, ms in c["times_ms"].items()),
                         *(f"{name} raised {error}" for name, error in c["failed"].items()),
                         *(f"{name} skipped ({why})" for name, why in c["skipped"].items())]) + f": {c['choice']}",
              {"choice": c["choice"], "times_ms": c["times_ms"], "failed": c["failed"], "skipped": c["skipped"]})
        for c in tune.report()
    ]  # fmt: skip


def _time(fn: Callable, reps: int = 20) -> float:
    """Median milliseconds of `fn` by CUDA events, warm-up excluded."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


# ---- report ----------------------------------------------------------------------------------


def run(out: Path | None, quick: bool, progress: Callable[[str], None]) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.time()
    with K.use_verify("off"):  # the doctor checks every backend itself, explicitly
        with tune.use_mode("off"):  # ... and the fused kernels themselves, not the faster candidate
            checks = parity(device, quick, progress)
        checks += graphs(device, progress) + speed(device, quick, progress) + choices(device, quick, progress)
    skipped = []
    if device.type != "cuda":
        skipped.append("speed: not measured on a CPU")
        skipped.append("bf16 and the CUDA extension: need a GPU")
        skipped.append("CUDA graphs: need a GPU; nothing was captured (their static-buffer path ran eagerly instead)")
        if "triton" not in {c.backend for c in checks}:
            skipped.append("Triton kernels: triton is not installed or its interpreter cannot run here")
    checks.sort(key=lambda c: c.passed is not False)  # failures first
    report = {"environment": environment(), "seconds": round(time.time() - started, 1), "skipped": skipped,
              "failed": sum(c.passed is False for c in checks), "checks": [asdict(c) for c in checks]}  # fmt: skip
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "doctor.json").write_text(json.dumps(report, indent=2))
        (out / "doctor.md").write_text(markdown(report))
    return report


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# trm doctor on {env['device']}", "",
             f"torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, numpy {env['numpy']}, "
             f"Python {env['python']}; {env['platform']}.",
             f"CUDA extension: {env['cuda_extension']}. Backend {env['backend']}, parity guard {env['verify']}.",
             "", f"**{report['failed']} failed** of {len(report['checks'])} checks "
             f"({report['seconds']} s)."]  # fmt: skip
    if "compute_capability" in env:
        lines.insert(3, f"GPU: compute capability {env['compute_capability']}, {env['sm_count']} SMs, "
                        f"{env['memory_gib']} GiB, driver {env['driver']}. {env['static_verification']}.")  # fmt: skip
    for item in report["skipped"]:
        lines.append(f"- skipped: {item}")
    lines += ["", "| result | check | op / step | backend | dtype | shape | detail |", "|---|---|---|---|---|---|---|"]
    for c in report["checks"]:
        verdict = {True: "pass", False: "**FAIL**", None: "measured"}[c["passed"]]
        lines.append(f"| {verdict} | {c['kind']} | {c['name']} | {c['backend']} | {c['dtype']} | {c['shape']} | "
                     f"{c['detail']} |")  # fmt: skip
    lines += ["", "`auto` tries, per op on this device: "
              + "; ".join(f"{op}: {' > '.join(order)}" for op, order in env["auto_order"].items())]  # fmt: skip
    return "\n".join(lines) + "\n"


def present(report: dict, out: Path | None, console) -> None:
    """The report on a terminal or in a log: the environment in two lines, the failures (if
    any) as a table, then the verdict, last, where it is read; the full table goes to
    doctor.md."""
    from rich.markup import escape
    from rich.table import Table

    env = report["environment"]
    console.print(f"trm doctor on {env['device']}: torch {env['torch']}, triton {env['triton']}, "
                  f"CUDA extension: {env['cuda_extension']}", highlight=False)  # fmt: skip
    for item in report["skipped"]:
        console.print(f"  skipped: {item}", highlight=False)
    checks = report["checks"]
    failed = [c for c in checks if c["passed"] is False]
    if failed:
        table = Table("check", "op / step", "backend", "dtype", "shape", "detail", title="failed checks")
        for c in failed:
            table.add_row(*(escape(str(c[k])) for k in ("kind", "name", "backend", "dtype", "shape", "detail")))
        console.print(table)
    measured = [c for c in checks if c["passed"] is None]
    for c in measured:
        console.print(f"  {c['kind']}: {c['name']} {c['backend']} {c['dtype']} {c['shape']}: {c['detail']}",
                      highlight=False)  # fmt: skip
    judged = [c for c in checks if c["passed"] is not None]
    groups = sorted({_tally(c) for c in judged})
    counts = ", ".join(f"{k} {sum(c['passed'] is True for c in judged if _tally(c) == k)}/"
                       f"{sum(_tally(c) == k for c in judged)}" for k in groups)  # fmt: skip
    if failed:
        console.print(f"[bold red]{len(failed)} of {len(checks) - len(measured)} checks failed[/] ({counts} passed, "
                      f"{report['seconds']} s); the guard uses the reference for the failing ops")  # fmt: skip
    else:
        console.print(f"[bold green]all {len(checks) - len(measured)} checks passed[/] ({counts}; "
                      f"{report['seconds']} s)")  # fmt: skip
    if out is not None:
        console.print(f"wrote {out / 'doctor.json'} and {out / 'doctor.md'} (every check)")
    else:
        console.print("--out DIR writes every check to DIR/doctor.md and DIR/doctor.json")


def _tally(check: dict) -> str:
    """The group a check is counted in: its kind, or for CUDA graphs on a CPU what ran instead."""
    return "static buffers, no graph captured" if check["backend"] == STATIC_BUFFERS else check["kind"]


def needs_interpreter() -> bool:
    """On a machine without a GPU, the Triton kernels can only be checked in the interpreter,
    which must be chosen before they are imported: in a child process."""
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    try:
        import triton
        from trm_kernels._triton import interpreter_problem
    except ImportError:
        return False
    return interpreter_problem(triton.__version__, np.__version__) is None


def main(argv: list[str] | None = None) -> int:
    """``python -m trm.doctor [--out DIR] [--quick]``: run and print; exit 1 when a check failed."""
    import argparse

    from rich.console import Console

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    report = checked_run(args.out, args.quick, Console(soft_wrap=True))
    return 1 if report["failed"] else 0


def checked_run(out: Path | None, quick: bool, console) -> dict:
    """run() with progress (a status line on a terminal, one line per case on stderr otherwise), then present()."""
    if console.is_terminal:
        with console.status("trm doctor") as status:
            report = run(out, quick, status.update)
    else:
        seen: set[str] = set()

        def progress(what: str) -> None:  # one line per case, not per dtype and backend (after the ": ")
            head = what.partition(": ")[0]
            if head not in seen:
                seen.add(head)
                print(head, file=sys.stderr, flush=True)

        report = run(out, quick, progress)
    present(report, out, console)
    return report


if __name__ == "__main__":
    sys.exit(main())
