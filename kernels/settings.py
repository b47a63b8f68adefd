"""The package's settings read from the environment (TRM_VERIFY, TRM_TUNE): one rule for all."""

from __future__ import annotations

import os


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    """The environment variable `name` (stripped, lower-case; `default` if unset or empty),
    refused with one line naming the variable when it is not one of `choices`."""
    value = os.environ.get(name, default).strip().lower() or default
    if value not in choices:
        raise ValueError(f"{name}={value!r}: choose one of {', '.join(choices)}")
    return value
