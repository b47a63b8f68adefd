"""AdamATan2 for the regular parameters, sign-SGD for the sparse puzzle embedding, warm-up, EMA."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .distributed import all_gather_cat
from .model import PuzzleEmbedding


def warmup_lr(base_lr: float, step: int, warmup_steps: int) -> float:
    """Linear warm-up then constant (the reference's cosine with min ratio 1). `step` counts from 1."""
    return base_lr * min(1.0, step / max(1, warmup_steps))


class AdamATan2(torch.optim.Optimizer):
    """Adam with atan2 in place of m / (sqrt(v) + eps): scale-invariant, no epsilon.

    p <- p * (1 - lr * wd);  p <- p - lr * atan2(m_hat, sqrt(v_hat)).
    """

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.95), weight_decay: float = 0.0):
        if lr < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid AdamATan2 settings: lr={lr}, betas={betas}, weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, wd, (beta1, beta2) = group["lr"], group["weight_decay"], group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                # bias corrections stay on the device: no host sync per step
                bc1 = 1 - torch.pow(beta1, state["step"])
                bc2 = 1 - torch.pow(beta2, state["step"])
                p.mul_(1 - lr * wd)
                state["exp_avg"].lerp_(p.grad, 1 - beta1)
                state["exp_avg_sq"].lerp_(p.grad.square(), 1 - beta2)
                update = torch.atan2(state["exp_avg"] / bc1, (state["exp_avg_sq"] / bc2).sqrt())
                p.add_(update, alpha=-lr)


class SparseSignSGD:
    """Sign-SGD with decoupled weight decay on the puzzle-embedding rows of the batch only.

    Rows shared by several batch slots (or processes) get the sum of their gradients,
    computed without a host sync: each slot's row gradient is summed over equal ids by a
    [B, B] equality matrix, so duplicates write identical values.
    """

    def __init__(self, embedding: PuzzleEmbedding, lr: float, weight_decay: float):
        self.embedding, self.lr, self.weight_decay = embedding, lr, weight_decay

    @torch.no_grad()
    def step(self) -> None:
        emb = self.embedding
        if emb.local_weights is None or emb.local_weights.grad is None:
            return
        ids, grad = emb.local_ids.long(), emb.local_weights.grad
        ids, grad = all_gather_cat(ids), all_gather_cat(grad)  # every process's batch rows
        same = (ids[:, None] == ids[None, :]).to(grad.dtype)
        summed = same @ grad
        rows = emb.weights[ids]
        emb.weights[ids] = rows * (1 - self.lr * self.weight_decay) - self.lr * torch.sign(summed)

    def zero_grad(self) -> None:
        if self.embedding.local_weights is not None:
            self.embedding.local_weights.grad = None


class EMA:
    """Exponential moving average of the regular parameters (fp32), rate `rate`.

    The puzzle-embedding table is not averaged (as in the reference, where it is a buffer):
    evaluation with EMA weights uses the live table, which is never copied.
    """

    def __init__(self, model: nn.Module, rate: float):
        self.rate = rate
        self.shadow = {name: p.detach().clone().float() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        names = list(self.shadow)
        torch._foreach_lerp_([self.shadow[n] for n in names], [params[n].float() for n in names], 1 - self.rate)

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily swap the EMA weights into `model`."""
        params = dict(model.named_parameters())
        backup = {n: params[n].detach().clone() for n in self.shadow}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self.shadow[n])
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(backup[n])
