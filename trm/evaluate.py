"""Evaluation: every example runs a fixed number of supervision steps; exact and token accuracy."""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import adaptive, checkpoint, distributed
from .arch import build_model
from .config import RunConfig
from .data import arc
from .data.dataset import Split, configure_model, load_split
from .losses import IGNORE_LABEL
from .model import RecursiveReasoningModel


def to_device(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device, non_blocking=True) for k, v in batch.items()}


def batches(index: np.ndarray, batch_size: int):
    """(rows, how many are real) per batch of `index`. A last partial batch is padded with
    copies of its last row to the first batch's size, so that every batch of a run has one
    shape: a new shape mid-run would capture another CUDA graph and time, check and autotune
    the fused kernels again. The padding is computed and not counted (rows are independent)."""
    width = min(batch_size, len(index))
    for start in range(0, len(index), batch_size):
        rows = index[start : start + batch_size]
        yield np.concatenate([rows, np.repeat(rows[-1:], width - len(rows))]), len(rows)


@torch.no_grad()
def evaluate(
    model: RecursiveReasoningModel,
    split: Split,
    batch_size: int,
    steps: int | None = None,
    wrong: list[int] | None = None,
) -> dict[str, float]:
    """Exact accuracy (whole sequence right) and token accuracy of the last step's argmax.

    `steps` defaults to the model's n_sup; more is test-time recursion. Under several
    processes each evaluates a strided share and the counts are summed. The indices of the
    puzzles this process got wrong are appended to `wrong` if given (a host read per batch).
    """
    device = model.y_init.device
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed.active() else (0, 1)
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # examples, exact, correct tokens, tokens
    index = np.arange(rank, len(split), world)
    for rows, real in batches(index, batch_size):
        batch = to_device(split.batch(rows), device)
        logits, _ = deque(model.solve(batch, steps), maxlen=1).pop()  # the last step's answer
        labels = batch["labels"][:real]
        mask = labels != IGNORE_LABEL
        correct = mask & (logits[:real].argmax(-1) == labels)
        if wrong is not None:
            wrong += rows[:real][(correct.sum(-1) != mask.sum(-1)).cpu().numpy()].tolist()
        totals += torch.stack(
            [
                torch.tensor(float(len(labels)), device=device),
                (correct.sum(-1) == mask.sum(-1)).sum().double(),
                correct.sum().double(),
                mask.sum().double(),
            ]
        )
    if distributed.active():
        dist.all_reduce(totals)
    model.train(was_training)
    examples, exact, correct, tokens = totals.tolist()
    return {"count": examples, "exact_accuracy": exact / max(examples, 1), "accuracy": correct / max(tokens, 1)}


def evaluate_adaptive(
    model: RecursiveReasoningModel,
    split: Split,
    batch_size: int,
    steps: int | None = None,
    threshold: float = 0.0,
    sync_every: int = 1,
) -> dict:
    """Adaptive evaluation (trm.adaptive): each puzzle halts on its own and frees its slot.

    Under several processes each solves a strided share; the per-puzzle results are gathered."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed.active() else (0, 1)
    index = np.arange(rank, len(split), world)
    rows = split.batch(index)
    solved = adaptive.solve(model, torch.from_numpy(rows["inputs"]), torch.from_numpy(rows["puzzle_identifiers"]),
                            batch_size, steps, threshold, sync_every)  # fmt: skip
    labels = rows["labels"]
    if distributed.active():
        parts = [None] * world
        dist.all_gather_object(parts, (solved, labels))
        solved = adaptive.Solved(np.concatenate([p[0].answers for p in parts]),
                                 np.concatenate([p[0].steps for p in parts]),
                                 np.concatenate([p[0].halt_logit for p in parts]),
                                 max(p[0].seconds for p in parts), max(p[0].model_steps for p in parts))  # fmt: skip
        labels = np.concatenate([p[1] for p in parts])
    return adaptive.summary(solved, labels, IGNORE_LABEL)


def model_from_checkpoint(path, device: torch.device, ema: bool = True) -> tuple[RecursiveReasoningModel, dict]:
    """The model of a checkpoint, with its EMA weights when present and `ema` is set."""
    tensors, meta = checkpoint.load(path)
    model = build_model(RunConfig.from_dict(meta["config"]).model)
    state = checkpoint.section(tensors, "model")
    averaged = checkpoint.section(tensors, "ema")
    if ema and averaged:
        state |= averaged
    checkpoint.load_state_dict_strict(model, state, str(path))
    return model.to(device).eval(), meta


def write_model_checkpoint(state: dict[str, torch.Tensor], cfg, data_dir, target) -> str:
    """A weights-only checkpoint (e.g. converted from the reference) that eval/solve can use."""
    if data_dir is not None:
        configure_model(cfg, data_dir)
    if "puzzle_emb.weights" in state:
        cfg.model.num_puzzle_identifiers = state["puzzle_emb.weights"].shape[0]
    model = build_model(cfg.model)
    checkpoint.load_state_dict_strict(model, state, "the reference checkpoint")
    meta = {"config": cfg.to_dict(), "step": 0, "data_dir": str(data_dir or ""), "world_size": 1}
    checkpoint.save(target, {f"model.{k}": v for k, v in model.state_dict().items()}, meta)
    return str(target)


@torch.no_grad()
def evaluate_arc(
    model: RecursiveReasoningModel,
    data_dir,
    batch_size: int,
    steps: int | None = None,
    halt: bool = False,
    threshold: float = 0.0,
):
    """ARC evaluation with de-augmentation and voting: (pass@1, pass@2, and the Votes).

    With `halt`, each augmented input stops on its own (trm.adaptive) and votes with its
    answer and halting logit at the step it halted; otherwise every input runs `steps`."""
    split = load_split(data_dir, "test")
    identifiers = json.loads((Path(data_dir) / "identifiers.json").read_text())
    votes = arc.Votes(identifiers, json.loads((Path(data_dir) / "test_targets.json").read_text()))
    model.eval()
    if halt:
        rows = split.batch(np.arange(len(split)))
        solved = adaptive.solve(model, torch.from_numpy(rows["inputs"]), torch.from_numpy(rows["puzzle_identifiers"]),
                                batch_size, steps, threshold)  # fmt: skip
        for i in range(len(split)):
            votes.add(solved.answers[i], int(split.puzzle_identifiers[i]), int(split.groups[i]),
                      float(solved.halt_logit[i]))  # fmt: skip
        steps_taken = solved.steps
    else:
        device = model.y_init.device
        for index, real in batches(np.arange(len(split)), batch_size):
            batch = to_device(split.batch(index), device)
            logits, q_halt = deque(model.solve(batch, steps), maxlen=1).pop()
            tokens, q = logits.argmax(-1).cpu().numpy(), q_halt.float().cpu().numpy()
            for row, i in enumerate(index[:real]):
                votes.add(tokens[row], int(split.puzzle_identifiers[i]), int(split.groups[i]), float(q[row]))
        steps_taken = np.full(len(split), steps or model.cfg.n_sup)
    result = {"pass@1": votes.pass_at(1), "pass@2": votes.pass_at(2), "count": len(votes.targets),
              "steps_mean": float(steps_taken.mean()) if len(split) else 0.0}  # fmt: skip
    return result, votes
