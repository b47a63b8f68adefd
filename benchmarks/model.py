"""Model-level benchmarks: a training step and a full evaluation solve, per provider.

Providers: ``eager`` (the reference ops), ``torch.compile`` and
``torch.compile reduce-overhead`` (both of the reference ops), ``fused`` (the trm_kernels
backend picked automatically) and ``fused + CUDA graphs`` (the no-grad recursion replayed).
Figures: step time, tokens/s (one supervision step of the batch), MFU from an analytic
FLOP count, peak memory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import trm_kernels as K

from trm.config import ModelConfig, preset
from trm.layers import intermediate_size
from trm.losses import act_loss
from trm.model import Carry, RecursiveReasoningModel, build_model
from trm.optim import AdamATan2

from .common import Row, bench
from .ops import fused_runs_on


def step_flops(cfg: ModelConfig, batch: int, train: bool) -> float:
    """Matrix FLOPs of one supervision step: every net call forward, the grad cycle's backward."""
    s, d = cfg.seq_len + cfg.puzzle_emb_len, cfg.hidden_size
    tokens = batch * s
    mlp = 2 * tokens * 3 * d * intermediate_size(d, cfg.expansion)
    if cfg.mlp_t:
        mixer = 2 * batch * d * 3 * s * intermediate_size(s, cfg.expansion)
    else:
        mixer = 2 * tokens * 4 * d * d + 4 * batch * s * s * d
    per_call = cfg.num_layers * (mlp + mixer)
    calls, grad_calls = cfg.T * (cfg.n + 1), cfg.n + 1
    head = 2 * batch * cfg.seq_len * d * cfg.vocab_size
    return per_call * calls + head + (2 * (per_call * grad_calls + head) if train else 0)


def _batch(cfg: ModelConfig, size: int, device: torch.device) -> dict[str, torch.Tensor]:
    shape = (size, cfg.seq_len)
    return {
        "inputs": torch.randint(1, cfg.vocab_size, shape, device=device),
        "labels": torch.randint(1, cfg.vocab_size, shape, device=device),
        "puzzle_identifiers": torch.zeros(size, dtype=torch.long, device=device),
    }


@dataclass(frozen=True)
class Provider:
    name: str
    backend: str  # trm_kernels backend
    compile_kwargs: dict | None = None  # torch.compile arguments, None: not compiled
    graphs: bool = False  # our CUDA graphs of the no-grad recursion


def _providers(device: torch.device, compile_ok: bool) -> list[Provider]:
    out = [Provider("eager", "reference")]
    if compile_ok:
        out += [Provider("torch.compile", "reference", {}),
                Provider("torch.compile reduce-overhead", "reference", {"mode": "reduce-overhead"})]  # fmt: skip
    if "triton" in K.available("add_rmsnorm") and fused_runs_on(device):
        fused = "auto" if device.type == "cuda" else "triton"
        out.append(Provider("fused", fused))
        if device.type == "cuda":
            out.append(Provider("fused + CUDA graphs", fused, graphs=True))
    return out


def _model(cfg: ModelConfig, provider: Provider, device: torch.device, train: bool) -> RecursiveReasoningModel:
    torch.manual_seed(0)
    cfg = dataclasses.replace(cfg, cuda_graphs=provider.graphs)
    return build_model(cfg).to(device).train(train)


def _train_case(name, cfg, batch, device, provider: Provider, gemm_tflops) -> Row:
    model = _model(cfg, provider, device, train=True)
    opt = AdamATan2(model.parameters(), lr=1e-4, weight_decay=0.1)
    data = _batch(cfg, batch, device)
    compile_kwargs = provider.compile_kwargs
    forward = torch.compile(model, **compile_kwargs) if compile_kwargs is not None else model
    state = {"carry": model.initial_carry(data)}

    graphed_by_compile = (compile_kwargs or {}).get("mode") == "reduce-overhead"

    def step():
        if graphed_by_compile:  # its graph outputs are overwritten by the next replay
            torch.compiler.cudagraph_mark_step_begin()
        with K.use_backend(provider.backend):
            carry, outputs = forward(state["carry"], data)
            loss, _ = act_loss(outputs, carry)
            (loss / batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if graphed_by_compile:  # what a user of reduce-overhead must do to keep the carry
            carry = Carry(carry.y.clone(), carry.z.clone(), carry.steps.clone(), carry.halted.clone(),
                          {k: v.clone() for k, v in carry.data.items()})  # fmt: skip
        state["carry"] = carry

    for _ in range(3):  # compile, autotune, allocate
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    ms = bench(step, device, reps=20)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    flops = step_flops(cfg, batch, train=True)
    tflops = flops / ms / 1e9
    return Row("training step", f"{name} B={batch}", provider.name, ms, tflops=tflops,
               extra={"tokens_per_s": batch * cfg.seq_len / ms * 1e3, "mfu": tflops / gemm_tflops,
                      "peak_gib": peak})  # fmt: skip


def _eval_case(name, cfg, batch, device, provider: Provider) -> Row:
    model = _model(cfg, provider, device, train=False)
    data = _batch(cfg, batch, device)
    compile_kwargs = provider.compile_kwargs
    solve_step = torch.compile(model.deep_recursion, **compile_kwargs) if compile_kwargs is not None else None

    @torch.no_grad()
    def solve():
        with K.use_backend(provider.backend):
            if solve_step is None:
                for _ in model.solve(data):
                    pass
                return
            x = model.embed(data["inputs"], data["puzzle_identifiers"])
            y, z = model.initial_y_z(batch)
            for _ in range(cfg.n_sup):
                y, z, _, _ = solve_step(x, y, z)
                y, z = y.clone(), z.clone()  # graph outputs are overwritten by the next replay

    solve()
    ms = bench(solve, device, reps=10)
    return Row("evaluation (full solve)", f"{name} B={batch}", provider.name, ms,
               extra={"puzzles_per_s": batch / ms * 1e3})  # fmt: skip


def configs(quick: bool) -> list[tuple[str, ModelConfig, list[int], list[int]]]:
    """(name, config, training batches, evaluation batches)."""
    dtype = "auto"
    if quick:
        tiny = dict(hidden_size=64, num_heads=2, T=2, n=1, n_sup=2, puzzle_emb_len=1, forward_dtype=dtype)
        return [("sudoku4-mlp", ModelConfig(vocab_size=6, seq_len=16, mlp_t=True, **tiny), [4], [1, 4]),
                ("sudoku4-att", ModelConfig(vocab_size=6, seq_len=16, mlp_t=False, **tiny), [4], [1])]  # fmt: skip
    out = []
    for name in ("sudoku-mlp", "sudoku-att", "maze", "hrm-sudoku"):  # HRM: the baseline, same ops
        cfg = preset(name).model
        cfg.forward_dtype = dtype
        # 768 at S = 916 may not fit one GPU (the reference splits it over 4): then 192 does
        out.append((name, cfg, [768] if name != "maze" else [768, 192], [1, 768]))
    return out


def run(device: torch.device, quick: bool, compile_ok: bool, gemm_tflops: float) -> list[Row]:
    rows = []
    for name, cfg, train_batches, eval_batches in configs(quick):
        for provider in _providers(device, compile_ok):
            jobs = [(_train_case, (name, cfg, b, device, provider, gemm_tflops)) for b in train_batches]
            jobs += [(_eval_case, (name, cfg, b, device, provider)) for b in eval_batches]
            for case, args in jobs:
                try:
                    row = case(*args)
                except torch.OutOfMemoryError:
                    print(f"out of memory: {name} {provider.name} {args[2]}")
                    continue
                finally:
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                print(f"{row.group:26s} {row.case:24s} {row.provider:32s} {row.ms:10.3f} ms {row.extra}", flush=True)
                rows.append(row)
    return rows
