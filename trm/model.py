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
from .layers import CastedLinear, ReasoningNet, casts_reused, trunc_normal_

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

    In training, the rows of the current batch are copied into a leaf tensor
    (``local_weights``, with ``local_ids``) whose gradient the sign-SGD optimizer applies to
    those rows only. The leaf is allocated once per batch size by ``reserve`` (called by
    ``initial_carry``, outside any compiled region) and refilled in place, which keeps the
    whole step capturable by torch.compile and CUDA graphs.
    """

    def __init__(self, num_ids: int, dim: int):
        super().__init__()
        self.register_buffer("weights", torch.zeros(num_ids, dim))
        # buffers (not saved), so that torch.compile's CUDA graphs treat them as static
        self.register_buffer("local_ids", None, persistent=False)
        self.register_buffer("local_weights", None, persistent=False)

    def reserve(self, batch_size: int) -> None:
        w, local = self.weights, self.local_weights
        # a module's .to() turns the leaf into a copy with history: allocate again then too
        if local is None or local.shape[0] != batch_size or local.device != w.device or not local.is_leaf:
            self.local_weights = torch.zeros(batch_size, w.shape[1], dtype=w.dtype, device=w.device, requires_grad=True)
            self.local_ids = torch.zeros(batch_size, dtype=torch.long, device=w.device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.weights[ids.long()]
        if not (self.training and torch.is_grad_enabled()):
            return rows
        self.reserve(ids.shape[0])
        with torch.no_grad():
            self.local_weights.copy_(rows)
            self.local_ids.copy_(ids)
        return self.local_weights


class RecursiveReasoningModel(nn.Module):
    """What TRM and HRM share: input embedding with the puzzle prefix, output heads, the
    initial y/z, deep supervision with ACT, evaluation, and the CUDA graphs.

    A subclass defines its nets and one supervision step, split into the part without
    gradient (``no_grad_part``, replayed as a CUDA graph) and the part with it (``grad_part``).
    """

    halt_on_q_continue = False  # halting rule: q_halt > 0 (TRM) or q_halt > q_continue (HRM)

    def __init__(self, cfg: ModelConfig, puzzle_emb_len: int):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.prefix = puzzle_emb_len
        self.seq_total = cfg.seq_len + puzzle_emb_len  # S
        self.embed_scale = math.sqrt(d)
        self.embed_tokens = nn.Module()
        self.embed_tokens.embedding_weight = nn.Parameter(trunc_normal_(torch.empty(cfg.vocab_size, d), std=d**-0.5))
        if puzzle_emb_len > 0:
            self.puzzle_emb = PuzzleEmbedding(cfg.num_puzzle_identifiers, d)
        if cfg.pos_encodings == "learned":  # reference: embed_pos, added to the input embedding
            self.embed_pos = nn.Module()
            self.embed_pos.embedding_weight = nn.Parameter(trunc_normal_(torch.empty(self.seq_total, d), std=d**-0.5))
        self.lm_head = CastedLinear(d, cfg.vocab_size)
        self.q_head = CastedLinear(d, 2, bias=True)  # logit 0: q_halt; 1: q_continue (HRM only)
        with torch.no_grad():
            self.q_head.weight.zero_()
            self.q_head.bias.fill_(-5.0)
        self.register_buffer("y_init", trunc_normal_(torch.empty(d), std=1.0))  # reference: H_init
        self.register_buffer("z_init", trunc_normal_(torch.empty(d), std=1.0))  # reference: L_init
        if not cfg.mlp_t:
            cos, sin = K.rope_cos_sin(self.seq_total, d // cfg.num_heads, cfg.rope_theta)
            if cfg.pos_encodings != "rope":  # the identity rotation: attention sees q and k exactly as projected
                cos, sin = torch.ones_like(cos), torch.zeros_like(sin)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        # captured per (batch, sequence) shape on first use; see trm/graphs.py
        self.graphs = {"no_grad_part": StaticGraph(self._no_grad_part), "eval_step": StaticGraph(self._eval_step)}

    def block_kwargs(self) -> dict:
        cfg = self.cfg
        return dict(hidden=cfg.hidden_size, num_heads=cfg.num_heads, expansion=cfg.expansion,
                    seq_len=self.seq_total, mlp_t=cfg.mlp_t, eps=cfg.rms_norm_eps)  # fmt: skip

    @property
    def dtype(self) -> torch.dtype:
        """The forward (compute) dtype; weights stay fp32."""
        if self.cfg.forward_dtype == "auto":
            return torch.bfloat16 if self.y_init.is_cuda else torch.float32
        return getattr(torch, self.cfg.forward_dtype)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The parameters' gradients and the puzzle-embedding rows' (a leaf kept across steps)."""
        super().zero_grad(set_to_none)
        if self.prefix > 0 and self.puzzle_emb.local_weights is not None:
            self.puzzle_emb.local_weights.grad = None

    def num_parameters(self) -> int:
        """Regular parameters (the puzzle-embedding table is a buffer, as in the paper's counts)."""
        return sum(p.numel() for p in self.parameters())

    def embed(self, inputs: torch.Tensor, puzzle_ids: torch.Tensor) -> torch.Tensor:
        """x: token embeddings with the puzzle prefix (plus learned positions, scaled by 1/sqrt(2)
        to keep the variance, as the reference does), times sqrt(D). [B, S, D]"""
        x = F.embedding(inputs.long(), self.embed_tokens.embedding_weight.to(self.dtype))
        if self.prefix > 0:
            puzzle = self.puzzle_emb(puzzle_ids).to(self.dtype)[:, None, :]
            x = torch.cat((F.pad(puzzle, (0, 0, 0, self.prefix - 1)), x), dim=1)
        if self.cfg.pos_encodings == "learned":
            x = 0.707106781 * (x + self.embed_pos.embedding_weight.to(self.dtype))
        return x * self.embed_scale

    def rope(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return (None, None) if self.cfg.mlp_t else (self.rope_cos, self.rope_sin)

    def no_grad_part(self, x, y, z) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def grad_part(self, x, y, z) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _heads(self, y) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [B, L, V] (prefix dropped) and the q logits [B, 2] (halt, continue) in fp32."""
        return self.lm_head(y)[:, self.prefix :], self.q_head(y[:, 0]).float()

    def _graphed(self, x: torch.Tensor) -> bool:
        """Whether the no-grad part runs as our CUDA graph: on a GPU, unless torch.compile is
        tracing the step (model.compile), which then compiles that part with the rest."""
        return self.cfg.cuda_graphs and x.is_cuda and not torch.compiler.is_compiling()

    def deep_recursion(self, x, y, z) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One supervision step. Returns detached (y, z), the logits and the q logits [B, 2]."""
        if self._graphed(x):
            y, z = self.graphs["no_grad_part"](x, y, z)
        else:
            y, z = self._no_grad_part(x, y, z)
        y, z = self.grad_part(x, y, z)
        return (y.detach(), z.detach(), *self._heads(y))

    @torch.no_grad()
    def _no_grad_part(self, x, y, z):
        with casts_reused(self):
            return self.no_grad_part(x, y, z)

    @torch.no_grad()
    def _eval_step(self, x, y, z):
        """A whole supervision step without grad (what evaluation replays)."""
        with casts_reused(self):
            y, z = self.grad_part(x, *self.no_grad_part(x, y, z))
            return (y, z, *self._heads(y))

    def initial_y_z(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (batch_size, self.seq_total, self.cfg.hidden_size)
        return self.y_init.to(self.dtype).expand(shape), self.z_init.to(self.dtype).expand(shape)

    def initial_carry(self, batch: Batch) -> Carry:
        """Every slot halted, so the first step loads the whole batch."""
        size = batch["inputs"].shape[0]
        if self.prefix > 0:
            self.puzzle_emb.reserve(size)
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

        x = self.embed(data["inputs"], data["puzzle_identifiers"])
        y, z, logits, q = self.deep_recursion(x, y, z)
        outputs = {"logits": logits, "q_halt": q[:, 0]}
        if self.halt_on_q_continue and self.training and self.cfg.n_sup > 1:
            outputs["q_continue"] = q[:, 1]  # with its gradient: the Q-continue loss trains the head

        with torch.no_grad():
            steps = steps + 1
            last = steps >= self.cfg.n_sup
            halted = last
            if self.training and self.cfg.n_sup > 1:
                halted = halted | (q[:, 0] > (q[:, 1] if self.halt_on_q_continue else 0))
                explore = torch.rand(q.shape[:1], device=q.device) < self.cfg.halt_exploration_prob
                min_steps = explore * torch.randint(2, self.cfg.n_sup + 1, steps.shape, device=steps.device)
                halted = halted & (steps >= min_steps)
                if self.halt_on_q_continue:
                    outputs["target_q_continue"] = self._q_target(x, y, z, last)
        return Carry(y, z, steps, halted, data), outputs

    def _q_target(self, x, y, z, last) -> torch.Tensor:
        """HRM's Q-learning target for q_continue: the next step's halting value."""
        step = self.graphs["eval_step"] if self._graphed(x) else self._eval_step
        next_q = step(x.detach(), y, z)[3]
        return torch.sigmoid(torch.where(last, next_q[:, 0], next_q.max(dim=-1).values))

    @torch.no_grad()
    def solve(self, batch: Batch, steps: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Evaluation: every example runs exactly `steps` supervision steps (default n_sup),
        no early halting. Yields (logits, q_halt) after each step; the last is the answer.
        On a GPU the step is a CUDA graph: each yielded pair is overwritten by the next step.
        """
        for logits, q in self.solve_steps(batch, steps):
            yield logits, q[:, 0]

    @torch.no_grad()
    def solve_steps(self, batch: Batch, steps: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """As ``solve``, yielding both q logits [B, 2] (halt, continue) after each step."""
        x = self.embed(batch["inputs"], batch["puzzle_identifiers"])
        y, z = self.initial_y_z(x.shape[0])
        step = self.graphs["eval_step"] if self._graphed(x) else self._eval_step
        for _ in range(steps or self.cfg.n_sup):
            y, z, logits, q = step(x, y, z)
            yield logits, q


class TRM(RecursiveReasoningModel):
    """One tiny net; T-1 latent recursions without gradient, then one with."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, cfg.puzzle_emb_len)
        self.net = ReasoningNet(cfg.num_layers, **self.block_kwargs())  # reference: L_level

    def latent_recursion(self, x, y, z) -> tuple[torch.Tensor, torch.Tensor]:
        """n updates of z from (y, x), then one update of y from z."""
        cos, sin = self.rope()
        for _ in range(self.cfg.n):
            z = self.net(z, y, x, cos=cos, sin=sin)
        y = self.net(y, z, cos=cos, sin=sin)
        return y, z

    def no_grad_part(self, x, y, z):
        for _ in range(self.cfg.T - 1):
            y, z = self.latent_recursion(x, y, z)
        return y, z

    def grad_part(self, x, y, z):
        return self.latent_recursion(x, y, z)
