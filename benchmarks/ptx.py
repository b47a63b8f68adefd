"""Compile every Triton kernel for Hopper (sm_90) ahead of time, on any machine, and report
what the PTX does: global loads and stores by width, matrix instructions, and (from
``ptxas -v``) registers per thread, spill bytes and shared memory.

    python -m trm_benchmarks.ptx            # JSON report on stdout

This needs no GPU (Triton ships ptxas) and must run without TRITON_INTERPRET. It catches
compile errors the interpreter cannot see, and shows whether memory-bound kernels move 16
bytes per access. Argument hints are those a real launch at TRM shapes gets (16-byte
aligned pointers; sizes divisible by 16 where TRM's are).
"""

from __future__ import annotations

import collections
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile


def _specs():
    # by module name: trm_kernels.swiglu / .inject are the public op functions
    attention, cross_entropy, inject, rmsnorm, swiglu, token_mlp = (
        importlib.import_module(f"trm_kernels.{m}")
        for m in ("attention", "cross_entropy", "inject", "rmsnorm", "swiglu", "token_mlp")
    )

    bf16 = "*bf16"
    # rows = 768 * 97 = 74496 and hidden 512 are multiples of 16; stride_outer is 0 on the hidden axis
    HIDDEN_DIV16 = {"N", "n_cols", "stride_outer", "stride_col"}  # noqa: N806
    norm = {"N": "i32", "n_cols": "i32", "stride_outer": "i32", "stride_col": "i32", "stride_n": "i32"}
    token_mlp_sig = {"H": bf16, "WGU": bf16, "WD": bf16, "OUT": bf16, "B": "i32", "S": "i32", "D": "i32",
                     "I_PAD": "i32", "eps": "fp32"}  # fmt: skip
    token_mlp_configs = {  # every config the autotuner may pick; Sudoku's mlp_t: S = 97, D = 512, I = 512
        f"token_mlp_rmsnorm_fwd S<={block_s} {bd}x{bi}": (
            token_mlp._token_mlp_rmsnorm_fwd, token_mlp_sig,
            {"BLOCK_S": block_s, "BLOCK_D": bd, "BLOCK_I": bi, "PREC": "tf32"}, {"D", "I_PAD"}, (warps, 2))
        for block_s, tiles in token_mlp.CONFIGS.items() for bd, bi, warps in tiles
    }  # fmt: skip
    return token_mlp_configs | {
        # name: (kernel, signature, constexprs, arguments hinted divisible by 16, launch options:
        # num_warps, or (num_warps, num_stages) where the launch sets the pipelining depth)
        "add_rmsnorm_fwd hidden": (
            rmsnorm._add_rmsnorm_fwd, {"X": bf16, "R": bf16, "Y": bf16, "RSTD": "*fp32", **norm, "eps": "fp32"},
            {"stride_n": 1, "HAS_R": True, "BLOCK_N": 512, "BLOCK_C": 16}, HIDDEN_DIV16, 8),
        "add_rmsnorm_fwd sequence": (
            rmsnorm._add_rmsnorm_fwd, {"X": bf16, "R": bf16, "Y": bf16, "RSTD": "*fp32", **norm, "eps": "fp32"},
            {"stride_col": 1, "HAS_R": True, "BLOCK_N": 128, "BLOCK_C": 64}, {"n_cols", "stride_outer", "stride_n"}, 8),
        "add_rmsnorm_bwd hidden": (
            rmsnorm._add_rmsnorm_bwd, {"DY": bf16, "X": bf16, "R": bf16, "RSTD": "*fp32", "DH": bf16, **norm},
            {"stride_n": 1, "HAS_R": True, "BLOCK_N": 512, "BLOCK_C": 16}, HIDDEN_DIV16, 8),
        "swiglu_fwd": (swiglu._swiglu_fwd, {"GU": bf16, "OUT": bf16, "n_out": "i32", "half": "i32"},
                       {"BLOCK": swiglu.BLOCK}, {"n_out", "half"}, 4),
        "swiglu_bwd": (swiglu._swiglu_bwd, {"DOUT": bf16, "GU": bf16, "DGU": bf16, "n_out": "i32", "half": "i32"},
                       {"BLOCK": swiglu.BLOCK}, {"n_out", "half"}, 4),
        "inject": (inject._inject, {"H": bf16, "A": bf16, "B": bf16, "OUT": bf16, "n": "i32"},
                   {"HAS_B": True, "BLOCK": inject.BLOCK}, {"n"}, 4),
        "cross_entropy_fwd": (
            cross_entropy._ce_fwd, {"LOGITS": bf16, "LABELS": "*i64", "LOSS": "*fp32", "DLOGITS": bf16,
                                    "n_rows": "i32", "V": "i32", "ignore_index": "i32"},
            {"STABLEMAX": True, "BLOCK_R": 64, "BLOCK_V": 16}, set(), 4),
        "attention_fwd": (
            attention._attn_fwd, {"QKV": bf16, "COS": "*fp32", "SIN": "*fp32", "OUT": bf16, "LSE": "*fp32",
                                  "S": "i32", "H": "i32", "scale": "fp32"},
            {"HALF": 32, "BLOCK_M": 64, "BLOCK_N": 64, "PREC": "tf32"}, set(), (4, 2)),
        "attention_bwd_dkdv": (
            attention._attn_bwd_dkdv, {"QKV": bf16, "COS": "*fp32", "SIN": "*fp32", "DOUT": bf16, "LSE": "*fp32",
                                       "DELTA": "*fp32", "DQKV": bf16, "S": "i32", "H": "i32", "scale": "fp32"},
            {"HALF": 32, "BLOCK_M": 64, "BLOCK_N": 64, "PREC": "tf32"}, set(), (4, 1)),
        "attention_bwd_dq": (
            attention._attn_bwd_dq, {"QKV": bf16, "COS": "*fp32", "SIN": "*fp32", "DOUT": bf16, "LSE": "*fp32",
                                     "DELTA": "*fp32", "DQKV": bf16, "S": "i32", "H": "i32", "scale": "fp32"},
            {"HALF": 32, "BLOCK_M": 64, "BLOCK_N": 64, "PREC": "tf32"}, set(), (4, 1)),
    }  # fmt: skip


def _resources(ptx: str, arch: str) -> dict:
    """Registers per thread and spill bytes, from ptxas -v on the kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90).path  # get_ptxas(arch) since triton 3.6
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        done = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "kernel.cubin")],
                              capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        return {"ptxas_error": done.stderr.strip().splitlines()[-1][:300]}
    info = done.stderr + done.stdout
    registers = re.search(r"Used (\d+) registers", info)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    return {
        "registers": int(registers.group(1)) if registers else None,
        "spill_store_bytes": int(spills.group(1)) if spills else None,
        "spill_load_bytes": int(spills.group(2)) if spills else None,
    }


def compile_all() -> dict[str, dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    report = {}
    for name, (kernel, signature, constexprs, div16, launch) in _specs().items():
        warps, stages = launch if isinstance(launch, tuple) else (launch, None)
        options = {"num_warps": warps} | ({"num_stages": stages} if stages is not None else {})
        args = list(kernel.arg_names)
        full = {a: signature.get(a, "constexpr") for a in args}
        hinted = [i for i, a in enumerate(args) if full[a].startswith("*") or a in div16]
        attrs = {(i,): [["tt.divisibility", 16]] for i in hinted}
        src = ASTSource(fn=kernel, signature=full, constexprs=constexprs, attrs=attrs)
        try:
            compiled = triton.compile(src, target=target, options=options)
        except Exception as e:  # report every kernel, not just the first failure
            report[name] = {"ok": False, "error": str(e).splitlines()[0][:300]}
            continue
        ptx = compiled.asm["ptx"]
        accesses = collections.Counter(re.findall(r"(?:ld|st)\.global[.a-z0-9]*", ptx))
        arch = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M)
        report[name] = {
            "ok": True,
            "launch": options,
            "accesses": dict(accesses),
            "vector_loads": sum(n for op, n in accesses.items() if op.startswith("ld") and ".v" in op),
            "scalar_loads": sum(n for op, n in accesses.items() if op.startswith("ld") and ".v" not in op),
            "mma": len(re.findall(r"\b(?:w?gmma|mma)\.", ptx)),
            "wgmma": len(re.findall(r"\bwgmma\.mma_async", ptx)),  # Hopper's warpgroup MMA
            "shared_bytes": compiled.metadata.shared,
            **_resources(ptx, arch.group(1) if arch else "sm_90a"),
        }
    return report


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("trm_benchmarks.ptx compiles real kernels: run it without TRITON_INTERPRET=1")
    print(json.dumps(compile_all(), indent=2))


if __name__ == "__main__":
    main()
