"""HRM (the paper's baseline): two block stacks, a 1-step gradient, ACT with a Q-learning target.

z_L (our ``z``) is updated by the low-level stack from z_H + x; z_H (our ``y``) by the
high-level stack from z_L. H_cycles (``cfg.T``) high-level updates, each after L_cycles
(``cfg.n``) low-level ones. Only the very last z_L and z_H updates carry gradients. Halting
compares q_halt with q_continue. q_continue learns from the next step's value, which is
computed by an extra forward pass without gradient. Built from the same trm_kernels ops
as TRM.
"""

from __future__ import annotations

from .config import ModelConfig
from .layers import ReasoningNet
from .model import RecursiveReasoningModel


class HRM(RecursiveReasoningModel):
    halt_on_q_continue = True

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, cfg.puzzle_emb_len)
        self.H_level = ReasoningNet(cfg.num_layers, **self.block_kwargs())
        self.L_level = ReasoningNet(cfg.num_layers, **self.block_kwargs())

    def no_grad_part(self, x, y, z):
        """Every update but the last z_L and the last z_H one."""
        cos, sin = self.rope()
        for h_step in range(self.cfg.T):
            last_h = h_step == self.cfg.T - 1
            for _ in range(self.cfg.n - 1 if last_h else self.cfg.n):
                z = self.L_level(z, y, x, cos=cos, sin=sin)
            if not last_h:
                y = self.H_level(y, z, cos=cos, sin=sin)
        return y, z

    def grad_part(self, x, y, z):
        cos, sin = self.rope()
        z = self.L_level(z, y, x, cos=cos, sin=sin)
        return self.H_level(y, z, cos=cos, sin=sin), z
