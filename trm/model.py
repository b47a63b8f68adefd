"""The Tiny Recursive Model: one tiny net, deep recursion, deep supervision with ACT.

Paper names are used throughout: ``y`` is the answer embedding (reference: ``z_H``), ``z``
the latent (``z_L``); ``T`` = ``H_cycles``, ``n`` = ``L_cycles``, ``n_sup`` = ``halt_max_steps``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import trm_kernels as K
from torch import nn

from .config import ModelConfig
from .graphs import StaticGraph
from .layers import CastedLinear, ReasoningNet, trunc_normal_

Batch = dict[str, torch.Tensor]  # inputs [B, L] int, labels [B, L] int (-100 = ignore), puzzle_identifiers [B]


@dataclass
class Carry:
    """What persists across supervision steps, one slot per batch row."""

    y: torch.Tensor  # [B, S, D]
    z: torch.Tensor  # [B, S, D]
    steps: torch.Tensor  # [B] int32, supervision steps taken on the slot's example
    halted: torch.Tensor  # [B] bool; a halted slot takes a new example at the next step
    data: Batch  # the example each slot is working on


class PuzzleEmbedding(nn.Module):
    """One vector per puzzle id, zero-initialised; not a regular parameter.

    In training, the rows of the current batch become a leaf tensor (``local_weights``)
    whose gradient the sign-SGD optimizer applies to those rows only.
    """

    def __init__(self, num_ids: int, dim: int):
        super().__init__()
        self.register_buffer("weights", torch.zeros(num_ids, dim))
        self.local_ids: torch.Tensor | None = None
        self.local_weights: torch.Tensor | None = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.weights[ids.long()]
        if self.training and torch.is_grad_enabled():
            rows = rows.detach().requires_grad_()
            self.local_ids, self.local_weights = ids, rows
        return rows


class TRM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.seq_total = cfg.seq_len + cfg.puzzle_emb_len  # S
        self.embed_scale = math.sqrt(d)
        self.embed_tokens = nn.Module()
        self.embed_tokens.embedding_weight = nn.Parameter(trunc_normal_(torch.empty(cfg.vocab_size, d), std=d**-0.5))
        if cfg.puzzle_emb_len > 0:
            self.puzzle_emb = PuzzleEmbedding(cfg.num_puzzle_identifiers, d)
        self.net = ReasoningNet(  # reference: L_level
            cfg.num_layers,
            hidden=d,
            num_heads=cfg.num_heads,
            expansion=cfg.expansion,
            seq_len=self.seq_total,
            mlp_t=cfg.mlp_t,
            eps=cfg.rms_norm_eps,
        )
        self.lm_head = CastedLinear(d, cfg.vocab_size)
        self.q_head = CastedLinear(d, 2, bias=True)  # logit 0: q_halt; 1: q_continue (unused by TRM)
        with torch.no_grad():
            self.q_head.weight.zero_()
            self.q_head.bias.fill_(-5.0)
        self.register_buffer("y_init", trunc_normal_(torch.empty(d), std=1.0))  # reference: H_init
        self.register_buffer("z_init", trunc_normal_(torch.empty(d), std=1.0))  # reference: L_init
        if not cfg.mlp_t:
            cos, sin = K.rope_cos_sin(self.seq_total, d // cfg.num_heads, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        # captured per (batch, sequence) shape on first use; see trm/graphs.py
        self.graphs = {
            "cycles": StaticGraph(lambda x, y, z: self._recursion(x, y, z, cfg.T - 1)),
            "eval_step": StaticGraph(self._eval_step),
        }

    @property
    def dtype(self) -> torch.dtype:
        """The forward (compute) dtype; weights stay fp32."""
        if self.cfg.forward_dtype == "auto":
            return torch.bfloat16 if self.y_init.is_cuda else torch.float32
        return getattr(torch, self.cfg.forward_dtype)

    def num_parameters(self) -> int:
        """Regular parameters (the puzzle-embedding table is a buffer, as in the paper's counts)."""
        return sum(p.numel() for p in self.parameters())

    def embed(self, inputs: torch.Tensor, puzzle_ids: torch.Tensor) -> torch.Tensor:
        """x: token embeddings with the puzzle prefix, times sqrt(D). [B, S, D]"""
        x = F.embedding(inputs.long(), self.embed_tokens.embedding_weight.to(self.dtype))
        if self.cfg.puzzle_emb_len > 0:
            puzzle = self.puzzle_emb(puzzle_ids).to(self.dtype)[:, None, :]
            x = torch.cat((F.pad(puzzle, (0, 0, 0, self.cfg.puzzle_emb_len - 1)), x), dim=1)
        return x * self.embed_scale

    def _rope(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return (None, None) if self.cfg.mlp_t else (self.rope_cos, self.rope_sin)

    def latent_recursion(self, x, y, z) -> tuple[torch.Tensor, torch.Tensor]:
        """n updates of z from (y, x), then one update of y from z."""
        cos, sin = self._rope()
        for _ in range(self.cfg.n):
            z = self.net(z, y, x, cos=cos, sin=sin)
        y = self.net(y, z, cos=cos, sin=sin)
        return y, z

    def _recursion(self, x, y, z, cycles: int) -> tuple[torch.Tensor, torch.Tensor]:
        for _ in range(cycles):
            y, z = self.latent_recursion(x, y, z)
        return y, z

    def _heads(self, y) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [B, L, V] (prefix dropped) and q_halt [B] in fp32."""
        return self.lm_head(y)[:, self.cfg.puzzle_emb_len :], self.q_head(y[:, 0]).float()[:, 0]

    def _graphed(self, x: torch.Tensor) -> bool:
        return self.cfg.cuda_graphs and x.is_cuda

    def deep_recursion(self, x, y, z) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One supervision step: T-1 latent recursions without grad, one with.

        Returns detached (y, z), the logits [B, L, V] and q_halt [B] (fp32).
        """
        if self.cfg.T > 1:
            if self._graphed(x):
                y, z = self.graphs["cycles"](x, y, z)
            else:
                with torch.no_grad():
                    y, z = self._recursion(x, y, z, self.cfg.T - 1)
        y, z = self.latent_recursion(x, y, z)
        return (y.detach(), z.detach(), *self._heads(y))

    @torch.no_grad()
    def _eval_step(self, x, y, z):
        """A whole supervision step without grad (what evaluation replays)."""
        y, z = self._recursion(x, y, z, self.cfg.T)
        return (y, z, *self._heads(y))

    def initial_y_z(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (batch_size, self.seq_total, self.cfg.hidden_size)
        return self.y_init.to(self.dtype).expand(shape), self.z_init.to(self.dtype).expand(shape)

    def initial_carry(self, batch: Batch) -> Carry:
        """Every slot halted, so the first step loads the whole batch."""
        size = batch["inputs"].shape[0]
        y, z = self.initial_y_z(size)
        device = batch["inputs"].device
        return Carry(
            y=torch.zeros_like(y),
            z=torch.zeros_like(z),
            steps=torch.zeros(size, dtype=torch.int32, device=device),
            halted=torch.ones(size, dtype=torch.bool, device=device),
            data={k: torch.zeros_like(v) for k, v in batch.items()},
        )

    def forward(self, carry: Carry, batch: Batch) -> tuple[Carry, dict[str, torch.Tensor]]:
        """One supervision step with ACT. Halted slots restart on `batch`'s example; others keep theirs.

        No host synchronisation: refills are masks and `where`.
        """
        reset = carry.halted
        y0, z0 = self.initial_y_z(reset.shape[0])
        y = torch.where(reset[:, None, None], y0, carry.y)
        z = torch.where(reset[:, None, None], z0, carry.z)
        steps = torch.where(reset, 0, carry.steps)
        data = {k: torch.where(reset.view(-1, *[1] * (v.dim() - 1)), batch[k], v) for k, v in carry.data.items()}

        y, z, logits, q_halt = self.deep_recursion(self.embed(data["inputs"], data["puzzle_identifiers"]), y, z)

        with torch.no_grad():
            steps = steps + 1
            halted = steps >= self.cfg.n_sup
            if self.training and self.cfg.n_sup > 1:
                halted = halted | (q_halt > 0)
                explore = torch.rand(q_halt.shape, device=q_halt.device) < self.cfg.halt_exploration_prob
                min_steps = explore * torch.randint(2, self.cfg.n_sup + 1, steps.shape, device=steps.device)
                halted = halted & (steps >= min_steps)
        return Carry(y, z, steps, halted, data), {"logits": logits, "q_halt": q_halt}

    @torch.no_grad()
    def solve(self, batch: Batch, steps: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Evaluation: every example runs exactly `steps` supervision steps (default n_sup),
        no early halting. Yields (logits, q_halt) after each step; the last is the answer.
        On a GPU the step is a CUDA graph: each yielded pair is overwritten by the next step.
        """
        x = self.embed(batch["inputs"], batch["puzzle_identifiers"])
        y, z = self.initial_y_z(x.shape[0])
        step = self.graphs["eval_step"] if self._graphed(x) else self._eval_step
        for _ in range(steps or self.cfg.n_sup):
            y, z, logits, q_halt = step(x, y, z)
            yield logits, q_halt
