"""Compile every Triton kernel for every NVIDIA architecture our users have, ahead of time
and without a GPU, and hold what the compiler produced against each architecture's limits.

    python -m trm_benchmarks.ptx                         # JSON on stdout: every arch, bf16, fp16 and fp32
    python -m trm_benchmarks.ptx --out DIR               # DIR/report.json and DIR/report.md
    python -m trm_benchmarks.ptx --arch 89,90 --dtype bf16

Each kernel is compiled once per autotuner config and launch variant the package can
choose, at TRM shapes, for sm_80, sm_86, sm_89, sm_90, sm_100 and sm_120 (``trm_kernels.arch``;
an architecture the installed Triton cannot target is reported, not skipped silently).
Per kernel and architecture: registers, spill bytes (``ptxas -v``), shared memory, the
matrix instructions used (mma.sync, Hopper's wgmma, Blackwell's tcgen05), global accesses by
width (16-byte ones counted apart), whether it can launch under the architecture's
per-block limits, and its theoretical occupancy. Argument hints are those a real launch at
TRM shapes gets (16-byte aligned pointers; sizes divisible by 16 where TRM's are). This
needs no GPU (Triton ships ptxas) and must run without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import datetime
import importlib
import importlib.util
import itertools
import json
import multiprocessing
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile

DTYPES = ("bf16", "fp16", "fp32")


def _specs(dtype: str = "bf16", capability: int = 90):
    """name: (kernel, signature, constexprs, arguments hinted divisible by 16, launch options:
    num_warps, or (num_warps, num_stages) where the launch sets the pipelining depth), as the
    package launches each kernel on a GPU of this compute capability."""
    import torch

    attention, cross_entropy, inject, rmsnorm, swiglu, channel_mlp, token_mlp, sandwich = (
        importlib.import_module(f"trm_kernels.{m}")
        for m in ("attention", "cross_entropy", "inject", "rmsnorm", "swiglu", "channel_mlp", "token_mlp", "sandwich")
    )

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    t = f"*{dtype}"
    prec = "ieee" if dtype == "fp32" else "tf32"  # as trm_kernels._triton.precision picks at run time
    # rows = 768 * 97 = 74496 and hidden 512 are multiples of 16; stride_outer is 0 on the hidden axis
    HIDDEN_DIV16 = {"N", "n_cols", "stride_outer", "stride_col"}  # noqa: N806
    SEQUENCE_DIV16 = {"n_cols", "stride_outer", "stride_n"}  # noqa: N806
    norm = {"N": "i32", "n_cols": "i32", "stride_outer": "i32", "stride_col": "i32", "stride_n": "i32"}
    norm_fwd = {"X": t, "R": t, "W": t, "Y": t, "SUM": t, "RSTD": "*fp32", **norm, "eps": "fp32"}
    norm_bwd = {"DY": t, "DSUM": t, "X": t, "R": t, "W": t, "RSTD": "*fp32", "DH": t, "DW": "*fp32", **norm}
    plain = {"HAS_R": True, "ROUND": True, "HAS_W": False, "PRENORM": False}

    def norm_tile(shape, dim):  # the tile and warps trm_kernels.rmsnorm launches at this shape
        sizes = rmsnorm._grid(torch.Size(shape), dim)[1]
        return {k: sizes[k] for k in ("BLOCK_N", "BLOCK_C")}, sizes["num_warps"]

    (hidden_tile, hidden_warps), (sequence_tile, sequence_warps) = norm_tile((74496, 512), -1), norm_tile(
        (768, 97, 512), 1)  # fmt: skip
    widest_tile, widest_warps = norm_tile((8, rmsnorm.MAX_N), -1)
    hidden = {"stride_n": 1, **plain, **hidden_tile}
    sequence = {"stride_col": 1, **plain, **sequence_tile}
    widest = {"stride_n": 1, **plain, **widest_tile}
    ce_rows, ce_classes, ce_warps = cross_entropy.tile(cross_entropy.MAX_VOCAB)
    trm_rows, trm_classes, ce_trm_warps = cross_entropy.tile(11)  # Sudoku's vocabulary
    ce_trm = {"BLOCK_R": trm_rows, "BLOCK_V": trm_classes}
    # a pre-norm block of another model: fp32 residual stream, bf16/fp16 branch, learnable fp32 weight
    prenorm_fwd = norm_fwd | {"R": "*fp32", "W": "*fp32", "SUM": "*fp32"}
    prenorm_bwd = norm_bwd | {"DSUM": "*fp32", "R": "*fp32", "W": "*fp32", "DH": "*fp32"}
    prenorm = {
        "stride_n": 1,
        "HAS_R": True,
        "ROUND": False,
        "HAS_W": True,
        "PRENORM": True,
        "BLOCK_N": 512,
        "BLOCK_C": 16,
    }  # fmt: skip  (the recurrent-depth LM's hidden 512, as _grid tiles it)
    # the sandwich norm (two norms a row, fp32 weights) at hidden 512, a language model's 4096, and its widest row
    sandwich_fwd = {"X": t, "R": t, "W": "*fp32", "W2": "*fp32", "S": t, "Y": t, "RSTD": "*fp32", "RSTD2": "*fp32",
                    **norm, "eps": "fp32"}  # fmt: skip
    sandwich_bwd = {"DS": t, "DY": t, "X": t, "R": t, "W": "*fp32", "W2": "*fp32", "RSTD": "*fp32", "RSTD2": "*fp32",
                    "DH": t, "DW": "*fp32", "DW2": "*fp32", **norm}  # fmt: skip
    sandwich_specs = {}
    for width in (512, 4096, sandwich.MAX_N):
        sizes = sandwich._grid(torch.Size((74496, width)))[1]
        meta = {"stride_n": 1, "ROUND": True, "BLOCK_N": sizes["BLOCK_N"], "BLOCK_C": sizes["BLOCK_C"]}
        for which, kernel, sig in (("fwd", sandwich._sandwich_fwd, sandwich_fwd),
                                   ("bwd", sandwich._sandwich_bwd, sandwich_bwd)):  # fmt: skip
            sandwich_specs[f"sandwich_rmsnorm_{which} hidden {width}"] = (kernel, sig, meta, HIDDEN_DIV16,
                                                                          sizes["num_warps"])  # fmt: skip
    token_mlp_sig = {"H": t, "WGU": t, "WD": t, "OUT": t, "SUM": t, "RSTD": "*fp32", "B": "i32", "S": "i32",
                     "D": "i32", "I_PAD": "i32", "eps": "fp32"}  # fmt: skip
    token_mlp_configs = {  # every config the autotuner may pick here (its family's); sudoku: S = 97, D = I = 512
        token_mlp.config_name(block_s, bd, bi, warps) + (" training" if store else ""): (
            token_mlp._token_mlp_rmsnorm_fwd, token_mlp_sig,
            {"BLOCK_S": block_s, "BLOCK_D": bd, "BLOCK_I": bi, "PREC": prec, "STORE": store}, {"D", "I_PAD"},
            (warps, 2))
        for block_s, tiles in token_mlp.configs(capability).items() for bd, bi, warps in tiles
        for store in (False, True)
    }  # fmt: skip
    token_bwd_sig = {"DSUM": t, "H": t, "WGU": t, "WD": t, "S": "i32", "D": "i32", "I_PAD": "i32"}
    token_dw_sig = token_bwd_sig | {"PARTIAL": "*fp32", "TILES": "i32", "PER_SPLIT": "i32"}
    for block_s, tiles in token_mlp.BWD_CONFIGS.items():  # the training backward's two recomputing kernels
        for which, kernel, sig in (
            ("dh", token_mlp._token_mlp_bwd_dh, token_bwd_sig | {"DH": t}),
            ("dw", token_mlp._token_mlp_bwd_dw, token_dw_sig),
        ):  # fmt: skip
            bd, bi, warps = tiles[which]
            token_mlp_configs[token_mlp.bwd_config_name(which, block_s)] = (
                kernel,
                dict(sorted(sig.items(), key=lambda kv: list(kernel.arg_names).index(kv[0]))),
                {"BLOCK_S": block_s, "BLOCK_D": bd, "BLOCK_I": bi, "PREC": prec},
                {"D", "I_PAD"},
                (warps, 2),
            )
    # the channel MLP: rows M = 768 * 97, hidden K = 512, intermediate N = 1536 (all multiples of 16)
    mlp_sizes = {"M": "i32", "N": "i32", "K": "i32"}
    mlp_fwd = {"X": t, "W": t, "UP": "i32", "ACT": t, "GU": t, **mlp_sizes}  # UP = I * K: the packed weight
    mlp_bwd = {"DY": t, "WD": t, "GU": t, "DGU": t, "ACT": t, **mlp_sizes}
    mlp_configs = {}
    for (bm, bn, bk, warps, stages), act in itertools.product(channel_mlp.CONFIGS, channel_mlp.ACTIVATIONS):
        meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": channel_mlp.GROUP_M, "PREC": prec,
                "ACTIVATION": act}  # fmt: skip
        mlp_configs[channel_mlp.config_name("fwd", bm, bn, bk, warps, stages, act)] = (
            channel_mlp._linear_swiglu_fwd,
            mlp_fwd,
            meta | {"STORE_GU": True},
            {"M", "N", "K", "UP"},
            (warps, stages),
        )
        mlp_configs[channel_mlp.config_name("bwd", bm, bn, bk, warps, stages, act)] = (
            channel_mlp._swiglu_mlp_bwd,
            mlp_bwd,
            meta,
            {"M", "N", "K"},
            (warps, stages),
        )
    # the down GEMM + residual + RMSNorm: hidden N = 512 is one tile (BLOCK_N), intermediate K = 1536
    # (a language model's post-norm with its learnable fp32 weight: the " with weight" variants)
    norm_sig = {"A": t, "WD": t, "H": t, "W": "*fp32", "OUT": t, "SUM": t, "RSTD": "*fp32", **mlp_sizes,
                "eps": "fp32"}  # fmt: skip
    for (bm, bk, warps, stages), weighted in itertools.product(channel_mlp.NORM_CONFIGS, (False, True)):
        meta = {"BLOCK_M": bm, "BLOCK_N": 512, "BLOCK_K": bk, "STORE_SUM": True, "HAS_W": weighted, "PREC": prec}
        mlp_configs[channel_mlp.norm_config_name(bm, bk, warps, stages) + " with weight" * weighted] = (
            channel_mlp._down_add_rmsnorm_fwd,
            norm_sig,
            meta,
            {"M", "N", "K"},
            (warps, stages),
        )
    bm, bi, bk, warps, stages = channel_mlp.ONE_KERNEL_CONFIG  # the whole sub-layer without grad, hidden 512
    for weighted, act in itertools.product((False, True), channel_mlp.ACTIVATIONS):
        suffix = (f" {act}" if act != "swiglu" else "") + " with weight" * weighted
        mlp_configs[channel_mlp.one_kernel_config_name() + suffix] = (
            channel_mlp._mlp_add_rmsnorm_fwd,
            {"H": t, "WG": t, "UP": "i32", "WD": t, "W": "*fp32", "OUT": t, "M": "i32", "N": "i32",
             "INTER": "i32", "eps": "fp32"},
            {"BLOCK_M": bm, "BLOCK_N": 512, "BLOCK_I": bi, "BLOCK_K": bk, "HAS_W": weighted, "ACTIVATION": act,
             "PREC": prec},
            {"M", "N", "INTER", "UP"},
            (warps, stages),
        )  # fmt: skip
    # a recurrent-depth LM's adapter on cat([state, embeds]): Huginn's Kx = Ke = N = 5280 (multiples of 16)
    concat_linear = importlib.import_module("trm_kernels.concat_linear")
    concat_sig = {"X": t, "E": t, "W": t, "BIAS": t, "OUT": t, "M": "i32", "N": "i32", "KX": "i32", "KE": "i32"}
    for bm, bn, bk, warps, stages in concat_linear.CONFIGS:
        meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": concat_linear.GROUP_M, "HAS_BIAS": True,
                "PREC": prec}  # fmt: skip
        mlp_configs[concat_linear.config_name(bm, bn, bk, warps, stages)] = (
            concat_linear._concat_linear_fwd,
            concat_sig,
            meta,
            {"M", "N", "KX", "KE"},
            (warps, stages),
        )
    attn = {"QKV": t, "COS": "*fp32", "SIN": "*fp32", "KEY_MASK": "*i8", "OUT": t, "LSE": "*fp32", "S": "i32",
            "H": "i32", "KVH": "i32", "scale": "fp32", "window": "i32"}  # fmt: skip
    attn_bwd = {"QKV": t, "QK": t, "COS": "*fp32", "SIN": "*fp32", "KEY_MASK": "*i8", "DOUT": t, "LSE": "*fp32",
                "DELTA": "*fp32", "DQKV": t, "S": "i32", "H": "i32", "KVH": "i32", "qk_stride": "i32",
                "scale": "fp32", "window": "i32"}  # fmt: skip
    trm_attention = {"D": 64, "HALF_P": 32, "D_P": 64, "PREC": prec, "ROPE": True, "CAUSAL": False, "HAS_MASK": False}
    # the variant a causal language model uses: GQA, RoPE, causal, a key mask, head size 128
    lm_attention = {"D": 128, "HALF_P": 64, "D_P": 128, "PREC": prec, "ROPE": True, "CAUSAL": True, "HAS_MASK": True}
    cc = divmod(capability, 10) if capability < 100 else (capability // 10, capability % 10)

    def attention_kernel(kernel, signature, meta, which):
        tile = attention.tiles(meta["D"], cc, torch_dtype, meta.get("INTERLEAVED", False))[which]
        return (kernel, signature, meta | {"BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n}, set(),
                (tile.warps, tile.stages))  # fmt: skip

    inject_sig = {"H": t, "A": t, "B": t, "OUT": t, "n": "i32", "d1": "i32", "d2": "i32", "a0": "i32", "a1": "i32",
                  "a2": "i32", "b0": "i32", "b1": "i32", "b2": "i32"}  # fmt: skip
    ce = {"LOGITS": t, "LABELS": "*i64", "LOSS": "*fp64", "DLOGITS": t, "n_rows": "i32", "V": "i32",
          "ignore_index": "i32"}  # fmt: skip
    if dtype == "fp32":  # fp32 on a GPU runs cuBLAS + the element-wise kernels instead (_triton.fits)
        token_mlp_configs, mlp_configs = {}, {}
    return token_mlp_configs | mlp_configs | {
        "add_rmsnorm_fwd hidden": (rmsnorm._add_rmsnorm_fwd, norm_fwd, hidden, HIDDEN_DIV16, hidden_warps),
        "add_rmsnorm_fwd sequence": (rmsnorm._add_rmsnorm_fwd, norm_fwd, sequence, SEQUENCE_DIV16, sequence_warps),
        "add_rmsnorm_bwd hidden": (rmsnorm._add_rmsnorm_bwd, norm_bwd, hidden, HIDDEN_DIV16, hidden_warps),
        "add_rmsnorm_bwd sequence": (rmsnorm._add_rmsnorm_bwd, norm_bwd, sequence, SEQUENCE_DIV16, sequence_warps),
        "add_rmsnorm_fwd pre-norm, weight": (rmsnorm._add_rmsnorm_fwd, prenorm_fwd, prenorm, HIDDEN_DIV16, 8),
        "add_rmsnorm_bwd pre-norm, weight": (rmsnorm._add_rmsnorm_bwd, prenorm_bwd, prenorm, HIDDEN_DIV16, 8),
        **{f"swiglu_{which}{'' if act == 'swiglu' else ' ' + act}": (
            kernel, sig, {"BLOCK": swiglu.BLOCK, "ACTIVATION": act}, {"n_out", "half"}, 4)
           for act in swiglu.GATED
           for which, kernel, sig in (("fwd", swiglu._swiglu_fwd, {"GU": t, "OUT": t, "n_out": "i32", "half": "i32"}),
                                      ("bwd", swiglu._swiglu_bwd, {"DOUT": t, "GU": t, "DGU": t, "n_out": "i32",
                                                                   "half": "i32"}))},
        "inject": (inject._inject, inject_sig, {"HAS_B": True, "BROADCAST": False, "BLOCK": inject.BLOCK}, {"n"}, 4),
        "inject broadcast": (inject._inject, inject_sig, {"HAS_B": True, "BROADCAST": True, "BLOCK": inject.BLOCK},
                             {"n", "d2", "a0", "b0", "b1"}, 4),
        "cross_entropy_fwd stablemax": (cross_entropy._ce_fwd, ce, {"STABLEMAX": True, **ce_trm}, set(), ce_trm_warps),
        "cross_entropy_fwd softmax": (cross_entropy._ce_fwd, ce | {"LOSS": "*fp32"}, {"STABLEMAX": False, **ce_trm},
                                      set(), ce_trm_warps),
        # the widest tiles the ops take: a row of MAX_N (hidden 16,384) and of MAX_VOCAB classes
        "add_rmsnorm_fwd widest": (rmsnorm._add_rmsnorm_fwd, norm_fwd, widest, HIDDEN_DIV16, widest_warps),
        "add_rmsnorm_bwd widest": (rmsnorm._add_rmsnorm_bwd, norm_bwd, widest, HIDDEN_DIV16, widest_warps),
        **sandwich_specs,
        "cross_entropy_fwd stablemax widest": (cross_entropy._ce_fwd, ce, {"STABLEMAX": True, "BLOCK_R": ce_rows,
                                               "BLOCK_V": ce_classes}, set(), ce_warps),
        "attention_fwd": attention_kernel(attention._attn_fwd, attn, trm_attention, "fwd"),
        "attention_bwd_delta": (
            attention._attn_bwd_delta, {"OUT": t, "DOUT": t, "DELTA": "*fp32", "S": "i32", "H": "i32"},
            {"D": 64, "D_P": 64, "BLOCK_M": attention.DELTA_ROWS}, set(), 4),
        "attention_bwd_rope": (
            attention._rope_qk, {"QKV": t, "COS": "*fp32", "SIN": "*fp32", "QK": t, "S": "i32", "H": "i32",
                                 "KVH": "i32"}, {"D": 64, "HALF_P": 32, "BLOCK_M": attention.DELTA_ROWS}, set(), 4),
        "attention_bwd_dkdv": attention_kernel(attention._attn_bwd_dkdv, attn_bwd, trm_attention, "dkdv"),
        "attention_bwd_dq": attention_kernel(attention._attn_bwd_dq, attn_bwd, trm_attention, "dq"),
        "attention_fwd causal GQA mask d128": attention_kernel(attention._attn_fwd, attn, lm_attention, "fwd"),
        "attention_bwd_dkdv causal GQA mask d128": attention_kernel(attention._attn_bwd_dkdv, attn_bwd,
                                                                    lm_attention, "dkdv"),
        "attention_bwd_dq causal GQA mask d128": attention_kernel(attention._attn_bwd_dq, attn_bwd, lm_attention,
                                                                  "dq"),
        **{f"{name}{label}": attention_kernel(kernel, sig, lm_attention | switch, which)
           for label, switch in ((" interleaved RoPE", {"INTERLEAVED": True}), (" window", {"WINDOW": True}))
           for name, kernel, sig, which in (("attention_fwd causal GQA mask d128", attention._attn_fwd, attn, "fwd"),
                                            ("attention_bwd_dkdv causal GQA mask d128", attention._attn_bwd_dkdv,
                                             attn_bwd, "dkdv"),
                                            ("attention_bwd_dq causal GQA mask d128", attention._attn_bwd_dq, attn_bwd,
                                             "dq"))},
        "attention_fwd interleaved RoPE": attention_kernel(attention._attn_fwd, attn,
                                                           trm_attention | {"INTERLEAVED": True}, "fwd"),
        "attention_bwd_rope interleaved": (
            attention._rope_qk, {"QKV": t, "COS": "*fp32", "SIN": "*fp32", "QK": t, "S": "i32", "H": "i32",
                                 "KVH": "i32"}, {"D": 64, "HALF_P": 32, "BLOCK_M": attention.DELTA_ROWS,
                                                 "INTERLEAVED": True}, set(), 4),
        **_kv_cache_specs(t, dtype, prec, cc, torch_dtype),
        **_qk_norm_specs(t),
    }  # fmt: skip


def _qk_norm_specs(t: str) -> dict:
    """QK-norm's pass (head size 128, the widest): before RoPE, after it (interleaved, at a
    cache's offsets), and their backwards."""
    from trm_kernels import qk_norm

    fwd = {"QKV": t, "COS": "*fp32", "SIN": "*fp32", "LENS": "*i32", "QW": "*fp32", "KW": "*fp32", "OUT": t,
           "S": "i32", "H": "i32", "KVH": "i32", "eps": "fp32"}  # fmt: skip
    bwd = {"QKV": t, "COS": "*fp32", "SIN": "*fp32", "QW": "*fp32", "KW": "*fp32", "G": t, "DQKV": t, "PART": "*fp32",
           "S": "i32", "H": "i32", "KVH": "i32", "eps": "fp32"}  # fmt: skip
    head = {"D": 128, "HALF_P": 64, "D_P": 128, "BLOCK_M": qk_norm.ROWS, "HAS_QW": True, "HAS_KW": True}
    before, interleaved = {"ROPE": False, "INTERLEAVED": False}, {"ROPE": True, "INTERLEAVED": True}
    after = {"ROPE": True, "INTERLEAVED": False, "HAS_QW": False, "HAS_KW": False}  # and without weights
    return {
        "qk_norm_fwd before RoPE d128": (qk_norm._qk_norm_fwd, fwd, head | before | {"HAS_LENS": False}, set(),
                                         qk_norm.WARPS),
        "qk_norm_fwd after interleaved RoPE, cache offsets d128": (
            qk_norm._qk_norm_fwd, fwd, head | interleaved | {"HAS_LENS": True}, set(), qk_norm.WARPS),
        "qk_norm_bwd before RoPE d128": (qk_norm._qk_norm_bwd, bwd, head | before, set(), qk_norm.WARPS),
        "qk_norm_bwd after RoPE d128, no weights": (qk_norm._qk_norm_bwd, bwd, head | after, set(), qk_norm.WARPS),
        "qk_norm_bwd after interleaved RoPE d128": (qk_norm._qk_norm_bwd, bwd, head | interleaved, set(),
                                                    qk_norm.WARPS),
    }  # fmt: skip


def _kv_cache_specs(t: str, dtype: str, prec: str, cc, torch_dtype) -> dict:
    """The KV-cache attention's kernels as an LM runs them (head size 128, GQA, RoPE): a decode
    step (one token, the group's heads in a tile, split over the cache), a prefill chunk, the
    interleaved convention with a sliding window, the chunks' combine and the cache write."""
    from trm_kernels import kv_cache

    strides = {"kc_b": "i32", "kc_s": "i32", "kc_h": "i32", "vc_b": "i32", "vc_s": "i32", "vc_h": "i32"}
    common = {"QKV": t, "COS": "*fp32", "SIN": "*fp32", "LENS": "*i32", "KC": t, "VC": t}
    write = common | {"Sq": "i32", "H": "i32", "KVH": "i32", **strides}
    attn = common | {"OUT": t, "PART_O": "*fp32", "PART_LSE": "*fp32", "Sq": "i32", "H": "i32", "KVH": "i32",
                     **strides, "chunk": "i32", "window": "i32", "scale": "fp32"}  # fmt: skip
    div16 = set(strides) | {"chunk"}
    head = {"D": 128, "HALF_P": 64, "D_P": 128, "ROPE": True}

    def attention(rows: int, **switches):
        block_m, block_n, warps = kv_cache.tile(rows, 128, cc, torch_dtype, switches.get("INTERLEAVED", False))
        meta = head | {"BLOCK_M": block_m, "BLOCK_N": block_n, "PREC": prec, "INTERLEAVED": False, "CAUSAL": True,
                       "WINDOW": False, "SPLITS": 1} | switches  # fmt: skip
        return (kv_cache._cache_attn, attn, meta, div16, (warps, 2))

    return {
        "kv_cache_write": (kv_cache._cache_write, write, head | {"BLOCK_M": kv_cache.WRITE_ROWS, "INTERLEAVED": False},
                           div16, 4),
        "kv_cache_attn decode, split": attention(4, SPLITS=8),
        "kv_cache_attn prefill chunk": attention(512),
        "kv_cache_attn interleaved, window": attention(512, INTERLEAVED=True, WINDOW=True),
        "kv_cache_attn decode, interleaved": attention(4, INTERLEAVED=True, SPLITS=8),
        "kv_cache_combine": (kv_cache._cache_combine, {"PART_O": "*fp32", "PART_LSE": "*fp32", "OUT": t,
                             "rows_total": "i32", "per_batch": "i32"},
                             {"D": 128, "D_P": 128, "SPLITS": 8, "BLOCK_R": kv_cache.COMBINE_ROWS}, set(), 4),
    }  # fmt: skip


def _ptxas_resources(ptx: str, capability: int, target: str) -> dict:
    """Registers per thread and spill bytes, from ptxas -v on the kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(capability).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        done = subprocess.run([ptxas, "-v", f"--gpu-name={target}", src, "-o", os.path.join(tmp, "kernel.cubin")],
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


def _access_bytes(op: str) -> int:
    """Bytes one thread moves in one global access: vector width times element width."""
    vec = re.search(r"\.v(\d)", op)
    bits = re.search(r"\.[bfsu](\d+)", op)
    return (int(vec.group(1)) if vec else 1) * (int(bits.group(1)) // 8 if bits else 4)


def _analyse(ptx: str) -> dict:
    accesses = collections.Counter(re.findall(r"(?:ld|st)\.global[.a-z0-9]*", ptx))
    loads = {op: n for op, n in accesses.items() if op.startswith("ld")}
    stores = {op: n for op, n in accesses.items() if op.startswith("st")}
    return {
        "accesses": dict(accesses),
        "loads_16B": sum(n for op, n in loads.items() if _access_bytes(op) == 16),
        "stores_16B": sum(n for op, n in stores.items() if _access_bytes(op) == 16),
        "vector_loads": sum(n for op, n in loads.items() if ".v" in op),
        "scalar_loads": sum(n for op, n in loads.items() if ".v" not in op),
        "other_loads": sum(n for op, n in loads.items() if _access_bytes(op) != 16),
        "mma_sync": len(re.findall(r"\bmma\.sync", ptx)),
        "wgmma": len(re.findall(r"\bwgmma\.mma_async", ptx)),  # Hopper's warpgroup MMA
        "tcgen05": len(re.findall(r"\btcgen05\.mma\b", ptx)),  # Blackwell's tensor-memory MMA
        "cp_async": len(re.findall(r"\bcp\.async\.(?:ca|cg)", ptx)),
    }


def compile_arch(capability: int, dtype: str) -> dict:
    """Every kernel of `_specs(dtype)` compiled for one architecture, with its resources."""
    import triton
    import trm_kernels.arch as A
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    arch = A.ARCHS[capability]
    target = GPUTarget("cuda", capability, 32)
    report = {}
    for name, (kernel, signature, constexprs, div16, launch) in _specs(dtype, capability).items():
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
            report[name] = {"ok": False, "error": (str(e).strip().splitlines() or [repr(e)])[0][:300]}
            continue
        ptx = compiled.asm["ptx"]
        ptx_target = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M)
        entry = {"ok": True, "launch": options, "shared_bytes": compiled.metadata.shared, **_analyse(ptx)}
        entry |= _ptxas_resources(ptx, capability, ptx_target.group(1) if ptx_target else arch.target)
        if entry.get("registers") is not None:
            problem = A.launch_problem(arch, entry["registers"], entry["shared_bytes"], warps)
            entry["launchable"] = problem is None
            if problem:
                entry["launch_problem"] = problem
            else:
                entry["blocks_per_sm"], entry["occupancy_limit"] = A.occupancy(
                    arch, entry["registers"], entry["shared_bytes"], warps
                )
                entry["warps_per_sm"] = entry["blocks_per_sm"] * warps
        report[name] = entry
    return report


def compile_all(archs=None, dtypes=("bf16",), workers: int | None = None) -> dict:
    """{"sm_XX": {dtype: {kernel: entry}}}, one process per (architecture, dtype)."""
    import trm_kernels.arch as A

    archs = list(archs or A.ARCHS)
    jobs = [(c, d) for c in archs for d in dtypes]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    results: dict = {A.ARCHS[c].target: {} for c in archs}
    if workers == 1:
        for c, d in jobs:
            results[A.ARCHS[c].target][d] = compile_arch(c, d)
        return results
    # spawn: each worker imports Triton afresh (nothing forked from a process holding torch's
    # threads); workers ignore Ctrl-C, which the parent handles by cancelling what has not started
    spawn, quiet = multiprocessing.get_context("spawn"), (signal.SIGINT, signal.SIG_IGN)
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=spawn, initializer=signal.signal, initargs=quiet)
    try:
        futures = {pool.submit(compile_arch, c, d): (c, d) for c, d in jobs}
        for future in concurrent.futures.as_completed(futures):
            c, d = futures[future]
            results[A.ARCHS[c].target][d] = future.result()
    finally:
        pool.shutdown(cancel_futures=True)
    return results


def environment() -> dict:
    import torch
    import triton

    return {"date": datetime.date.today().isoformat(), "triton": triton.__version__, "torch": torch.__version__,
            "gpu": "none: compiled ahead of time, nothing ran"}  # fmt: skip


def markdown(report: dict) -> str:
    """The per-architecture tables of a report (``compile_all`` plus ``environment``)."""
    import trm_kernels.arch as A

    env = report["environment"]
    lines = [
        "# Triton kernels compiled for every target architecture, without a GPU",
        "",
        f"{env['date']}; `python -m trm_benchmarks.ptx --out DIR` with triton {env['triton']}, torch {env['torch']}.",
        "Static analysis of the compiled PTX (TRM shapes: hidden 512, head_dim 64, Sudoku's S = 97) and of",
        "`ptxas -v` on it. **No timings: nothing here ran on a GPU.** Whether a kernel can launch and its",
        f"occupancy follow from each architecture's limits ({A.SOURCE}).",
        "",
        "| arch | cards | shared memory per block / per SM | threads per SM | blocks per SM | MMA |",
        "|---|---|---:|---:|---:|---|",
    ]
    for a in A.ARCHS.values():
        lines.append(f"| {a.target} | {a.cards} | {a.shared_per_block // 1024} / {a.shared_per_sm // 1024} KB | "
                     f"{a.threads_per_sm} | {a.blocks_per_sm} | {a.mma} |")  # fmt: skip
    for target, by_dtype in report["archs"].items():
        lines += ["", f"## {target}", ""]
        rows = by_dtype.get("bf16") or next(iter(by_dtype.values()))
        dtype = "bf16" if "bf16" in by_dtype else next(iter(by_dtype))
        failed = [n for n, r in rows.items() if not r["ok"]]
        if len(failed) == len(rows):
            lines.append(f"Not supported by triton {env['triton']}: {rows[failed[0]]['error']}")
            continue
        lines += [
            f"{dtype}. MMA: mma.sync / wgmma / tcgen05 instruction counts. 16-byte: loads / stores of 16 bytes.",
            "",
            "| kernel | warps/stages | registers | spill bytes | shared bytes | MMA | 16-byte ld / st | other ld | "
            "launches | blocks per SM (limit) |",
            "|---|---|---:|---:|---:|---|---:|---:|---|---|",
        ]
        for name, r in rows.items():
            if not r["ok"]:
                lines.append(f"| {name} | compile error: {r['error']} |||||||||")
                continue
            launch = r["launch"]
            ws = f"{launch['num_warps']}" + (f"/{launch['num_stages']}" if "num_stages" in launch else "")
            mma = f"{r['mma_sync']} / {r['wgmma']} / {r['tcgen05']}"
            spill = (r.get("spill_store_bytes") or 0) + (r.get("spill_load_bytes") or 0)
            launches = "yes" if r.get("launchable") else f"**no**: {r.get('launch_problem', r.get('ptxas_error'))}"
            occ = f"{r['blocks_per_sm']} ({r['occupancy_limit']})" if r.get("launchable") else "-"
            lines.append(f"| {name} | {ws} | {r.get('registers')} | {spill} | {r['shared_bytes']} | {mma} | "
                         f"{r['loads_16B']} / {r['stores_16B']} | {r['other_loads']} | "
                         f"{launches} | {occ} |")  # fmt: skip
        others = [d for d in by_dtype if d != dtype]
        for other in others:

            def key(r):
                return r.get("launchable"), r.get("shared_bytes")

            diff = [n for n, r in by_dtype[other].items() if r.get("ok") and rows.get(n, {}).get("ok")
                    and key(r) != key(rows[n])]  # fmt: skip
            fails = [n for n, r in by_dtype[other].items() if not r["ok"] or not r.get("launchable")]
            launch = f"cannot launch: {', '.join(fails)}. " if fails else "every kernel launches. "
            same = (f"Shared memory or launchability differs from {dtype} for: {', '.join(diff)}." if diff
                    else f"Shared memory and launchability as {dtype}.")  # fmt: skip
            lines += ["", f"{other}: {launch}{same}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import trm_kernels.arch as A

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default=",".join(str(c) for c in A.ARCHS),
                        help="compute capabilities, comma-separated (default: %(default)s)")  # fmt: skip
    parser.add_argument("--dtype", default=",".join(DTYPES), help="bf16, fp16 and/or fp32 (default: %(default)s)")
    parser.add_argument("--out", type=pathlib.Path, help="write report.json and report.md here instead of stdout")
    parser.add_argument("--workers", type=int, default=None, help="compiling processes (default: one per core)")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("triton") is None:
        parser.exit(2, 'error: this needs Triton (no GPU needed): pip install -e ".[triton]"\n')
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.exit(2, "error: trm_benchmarks.ptx compiles real kernels: run it without TRITON_INTERPRET=1\n")
    try:
        archs = [int(c.strip().removeprefix("sm_")) for c in args.arch.split(",")]
    except ValueError:
        parser.exit(2, f"error: --arch {args.arch}: compute capabilities such as 80,89,90\n")
    unknown = [c for c in archs if c not in A.ARCHS]
    dtypes = [d.strip() for d in args.dtype.split(",")]
    if unknown or not set(dtypes) <= set(DTYPES):
        parser.exit(2, f"error: --arch from {sorted(A.ARCHS)}, --dtype from {DTYPES}\n")
    report = {"environment": environment(), "archs": compile_all(archs, dtypes, args.workers)}
    if args.out is None:
        print(json.dumps(report, indent=2))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "report.md").write_text(markdown(report))
    print(f"wrote {args.out / 'report.json'} and {args.out / 'report.md'}", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted: no report written")
