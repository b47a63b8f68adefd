"""The architectures by name: ``build_model(cfg)`` for ``cfg.arch`` in ("trm", "hrm")."""

from __future__ import annotations

from .config import ModelConfig
from .hrm import HRM
from .model import TRM, RecursiveReasoningModel

ARCHITECTURES = {"trm": TRM, "hrm": HRM}


def build_model(cfg: ModelConfig) -> RecursiveReasoningModel:
    """The model a config names (``cfg.arch``)."""
    if cfg.arch not in ARCHITECTURES:
        raise ValueError(f"unknown model arch {cfg.arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[cfg.arch](cfg)
