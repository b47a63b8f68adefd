"""CUDA graphs for the no-grad parts of the recursion.

``StaticGraph(fn)`` runs a no-grad function through static input/output buffers. On a
GPU it captures fn once per input signature (shapes, dtypes, device) as a CUDA graph and
replays it. Each call copies the inputs into the static buffers and returns the static
outputs. Those live in the graph's memory and are overwritten by the next call, so copy
what must survive it. Without a GPU (or with ``capture=False``) the same static-buffer
path runs eagerly, which is how its semantics are tested on CPU.

Before capture, fn runs three times on a side stream: Triton JIT compilation, autotuning
and the CUDA extension's build happen there, never inside a capture. Parameters are read
by address: the optimizer, the EMA swap and load_state_dict all update them in place, so
later replays see the new values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Signature = tuple[tuple[tuple[int, ...], torch.dtype, torch.device], ...]


@dataclass
class _Entry:
    inputs: tuple[torch.Tensor, ...]
    outputs: tuple[torch.Tensor, ...]
    graph: torch.cuda.CUDAGraph | None


class StaticGraph:
    def __init__(self, fn: Callable[..., tuple[torch.Tensor, ...]], capture: bool = True, warmup: int = 3):
        self.fn, self.capture, self.warmup = fn, capture, warmup
        self._entries: dict[Signature, _Entry] = {}
        self._pool = None

    def __len__(self) -> int:
        return len(self._entries)

    @torch.no_grad()
    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        key = tuple((tuple(t.shape), t.dtype, t.device) for t in inputs)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = self._make(inputs)
        else:
            for static, new in zip(entry.inputs, inputs, strict=True):
                if static is not new:
                    static.copy_(new)
        if entry.graph is not None:
            entry.graph.replay()
        else:
            for static, new in zip(entry.outputs, self.fn(*entry.inputs), strict=True):
                static.copy_(new)
        return entry.outputs

    def _make(self, inputs: tuple[torch.Tensor, ...]) -> _Entry:
        static = tuple(t.detach().clone() for t in inputs)
        if not (self.capture and static[0].is_cuda):
            return _Entry(static, tuple(torch.empty_like(t) for t in self.fn(*static)), None)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            outputs = tuple(self.fn(*static))
        return _Entry(static, outputs, graph)
