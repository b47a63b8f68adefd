"""CUDA graphs for the no-grad parts of the recursion.

``StaticGraph(fn)`` runs a no-grad function through static input/output buffers. On a
GPU it captures fn once per input signature (shapes, dtypes, device) as a CUDA graph and
replays it. Each call copies the inputs into the static buffers and returns the static
outputs. Those live in the graph's memory and are overwritten by the next call, so copy
what must survive it. Without a GPU (or with ``capture=False``) the same static-buffer
path runs eagerly, which is how its semantics are tested on CPU.

Before capture, fn runs three times on a side stream: Triton JIT compilation, autotuning,
the CUDA extension's build and the fused ops' parity checks happen there, never inside a
capture. The first replay must match the eager result on the same inputs; a
capture that fails, or a replay that differs, falls back to the eager static-buffer path
with one warning. Parameters are read
by address: the optimizer, the EMA swap and load_state_dict all update them in place, so
later replays see the new values.
"""

from __future__ import annotations

import warnings
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

    def _can_capture(self, t: torch.Tensor) -> bool:
        return self.capture and t.is_cuda

    def _eager(self, static: tuple[torch.Tensor, ...]) -> _Entry:
        return _Entry(static, tuple(torch.empty_like(t) for t in self.fn(*static)), None)

    def _make(self, inputs: tuple[torch.Tensor, ...]) -> _Entry:
        static = tuple(t.detach().clone() for t in inputs)
        if not self._can_capture(static[0]):
            return self._eager(static)
        try:
            return self._captured(static)
        except Exception as e:  # a capture that fails (or replays wrong) must not end the run
            name = getattr(self.fn, "__name__", "a step")
            warnings.warn(f"CUDA-graph capture of {name} failed, running it eagerly through the same static "
                          f"buffers instead: {e}", GraphWarning, stacklevel=3)  # fmt: skip
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return self._eager(static)

    def _captured(self, static: tuple[torch.Tensor, ...]) -> _Entry:
        """Warm up on a side stream (JIT, autotuning, the parity checks of trm_kernels.verify),
        capture, then replay once and compare with the eager result on the same inputs."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                eager = tuple(t.clone() for t in self.fn(*static))
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            outputs = tuple(self.fn(*static))
        graph.replay()
        for i, (got, want) in enumerate(zip(outputs, eager, strict=True)):
            try:  # a few ulps may differ (library heuristics); a broken capture differs by far more
                torch.testing.assert_close(got, want)
            except AssertionError as e:
                raise RuntimeError(f"the first replay differs from the eager result in output {i}: {e}") from None
        return _Entry(static, outputs, graph)


class GraphWarning(RuntimeWarning):
    """A CUDA graph could not be captured or replayed correctly; the eager path runs instead."""
