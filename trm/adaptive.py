"""Adaptive evaluation: each puzzle halts when its head says so, and its batch slot takes the next
puzzle at once (continuous batching).

Every slot of a batch runs its own puzzle from the initial y/z, one supervision step at a
time, until its halting logit crosses ``threshold`` (q_halt for TRM, q_halt - q_continue for
HRM: the training rule at 0) or it has taken ``max_steps`` steps, which may exceed n_sup
(test-time depth). The answer is the argmax at the step it halted. Slots are refilled by
index and ``where`` on the device; the host reads which slots halted every ``sync_every``
steps (a slot that halts between two reads keeps its answer and idles until the next). The
step is the model's evaluation step, replayed as a CUDA graph on a GPU (refills happen
around it). On a CPU, once every puzzle has been queued and at most half the slots still
work, the run continues with those slots only (on a GPU the batch keeps its shape: a new
one would capture another graph and time and check the fused kernels again). With ``threshold=inf`` every puzzle runs
exactly ``max_steps`` steps: fixed-step evaluation.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from .model import RecursiveReasoningModel


@dataclass
class Solved:
    """What adaptive evaluation found for each puzzle, in the order of the inputs given."""

    answers: np.ndarray  # [N, L] token ids at the halting step
    steps: np.ndarray  # [N] supervision steps taken
    halt_logit: np.ndarray  # [N] the halting logit at that step (sigmoid: the model's confidence)
    seconds: float
    model_steps: int  # batch steps run (each one evaluation step of the whole batch)


def halting_logit(model: RecursiveReasoningModel, q: torch.Tensor) -> torch.Tensor:
    return q[:, 0] - q[:, 1] if model.halt_on_q_continue else q[:, 0]


@dataclass
class Slots:
    """The device state of a batch of slots: each slot's embedded puzzle, y and z, whether it
    still works, steps taken, and the answer, step and halting logit it halted with."""

    x: torch.Tensor
    y: torch.Tensor
    z: torch.Tensor
    live: torch.Tensor
    taken: torch.Tensor
    answer: torch.Tensor
    at_steps: torch.Tensor
    at_logit: torch.Tensor
    y0: torch.Tensor  # the initial y and z of every slot (views)
    z0: torch.Tensor

    @classmethod
    def empty(cls, model: RecursiveReasoningModel, width: int, length: int) -> Slots:
        device = model.y_init.device
        y0, z0 = model.initial_y_z(width)
        answer = torch.zeros((width, length), dtype=torch.long, device=device)
        zeros = torch.zeros(width, dtype=torch.long, device=device)
        return cls(model.embed(answer, answer[:, 0]), y0.contiguous().clone(), z0.contiguous().clone(),
                   torch.zeros(width, dtype=torch.bool, device=device), zeros, answer, zeros.clone(),
                   torch.zeros(width, dtype=torch.float32, device=device), y0, z0)  # fmt: skip

    def refill(self, model: RecursiveReasoningModel, slots: torch.Tensor, inputs: torch.Tensor, ids: torch.Tensor):
        """Load new puzzles (token ids, puzzle ids on the device) into `slots` (device indices)."""
        self.x[slots] = model.embed(inputs, ids)
        self.y[slots], self.z[slots] = self.y0[: len(slots)], self.z0[: len(slots)]
        self.live[slots], self.taken[slots] = True, 0

    def advance(self, model: RecursiveReasoningModel, step, max_steps: int, threshold: float) -> None:
        """One supervision step of every slot; the slots that halt keep that step's answer."""
        self.y, self.z, logits, q = step(self.x, self.y, self.z)
        self.taken += self.live
        logit = halting_logit(model, q).float()
        halts = self.live & ((logit > threshold) | (self.taken >= max_steps))
        self.answer = torch.where(halts[:, None], logits.argmax(-1), self.answer)
        self.at_steps = torch.where(halts, self.taken, self.at_steps)
        self.at_logit = torch.where(halts, logit, self.at_logit)
        self.live = self.live & ~halts

    def keep(self, index: torch.Tensor) -> None:
        """Only the slots at `index` from now on."""
        for name in ("x", "y", "z", "live", "taken", "answer", "at_steps", "at_logit"):
            setattr(self, name, getattr(self, name)[index])


@torch.no_grad()
def solve(
    model: RecursiveReasoningModel,
    inputs: torch.Tensor,
    puzzle_identifiers: torch.Tensor,
    batch_size: int,
    max_steps: int | None = None,
    threshold: float = 0.0,
    sync_every: int = 1,
) -> Solved:
    """Solve every row of `inputs` [N, L] (token ids, any device) with continuous batching."""
    if batch_size < 1 or sync_every < 1:
        raise ValueError(f"batch_size {batch_size} and sync_every {sync_every} must be >= 1")
    max_steps = max_steps or model.cfg.n_sup
    if max_steps < 1:
        raise ValueError(f"max_steps {max_steps} must be >= 1")
    device, n = model.y_init.device, len(inputs)
    started = time.perf_counter()
    answers = np.zeros(tuple(inputs.shape), dtype=np.int64)
    steps_out, logit_out = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.float32)
    width = min(batch_size, n)
    if width == 0:
        return Solved(answers, steps_out, logit_out, 0.0, 0)
    was_training = model.training
    model.eval()
    state = Slots.empty(model, width, inputs.shape[1])
    owner = np.full(width, -1)  # the puzzle each slot works on (-1: free)
    graphed = model._graphed(state.x)
    step = model.graphs["eval_step"] if graphed else model._eval_step
    queued, model_steps = 0, 0
    while True:
        free = np.flatnonzero(owner < 0)[: n - queued]
        if len(free):
            rows = torch.arange(queued, queued + len(free))
            state.refill(model, torch.from_numpy(free).to(device), inputs[rows].to(device, torch.long),
                         puzzle_identifiers[rows].to(device, torch.long))  # fmt: skip
            owner[free] = rows.numpy()
            queued += len(free)
        if not (owner >= 0).any():
            break
        for _ in range(sync_every):
            state.advance(model, step, max_steps, threshold)
            model_steps += 1
        done = np.flatnonzero((owner >= 0) & ~state.live.cpu().numpy())  # the host reads the batch here
        if len(done):
            index = owner[done]
            answers[index] = state.answer[done].cpu().numpy()
            steps_out[index] = state.at_steps[done].cpu().numpy()
            logit_out[index] = state.at_logit[done].cpu().numpy()
            owner[done] = -1
        busy = np.flatnonzero(owner >= 0)
        if queued == n and 0 < len(busy) <= len(owner) // 2 and not state.x.is_cuda:
            # nothing left to queue: run only the slots still working. Not on a GPU: a new batch shape there
            # would capture another CUDA graph and time, check and autotune the fused kernels again mid-run
            state.keep(torch.from_numpy(busy).to(device))
            owner = owner[busy]
    model.train(was_training)
    return Solved(answers, steps_out, logit_out, time.perf_counter() - started, model_steps)


def summary(solved: Solved, labels: np.ndarray, ignore_label: int = -100) -> dict:
    """Exact and token accuracy, steps per puzzle (mean, median, p90, max, histogram), puzzles/s."""
    mask = labels != ignore_label
    correct = mask & (solved.answers == labels)
    n = len(labels)
    steps = solved.steps
    return {
        "count": n,
        "exact_accuracy": float((correct.sum(-1) == mask.sum(-1)).mean()) if n else 0.0,
        "accuracy": float(correct.sum() / max(mask.sum(), 1)),
        "steps_mean": float(steps.mean()) if n else 0.0,
        "steps_median": float(np.median(steps)) if n else 0.0,
        "steps_p90": float(np.percentile(steps, 90)) if n else 0.0,
        "steps_max": int(steps.max()) if n else 0,
        "steps_histogram": {int(k): int(v) for k, v in zip(*np.unique(steps, return_counts=True), strict=True)},
        "seconds": solved.seconds,
        "puzzles_per_second": n / solved.seconds if solved.seconds else math.inf,
        "batch_steps": solved.model_steps,
    }
