"""A loss/accuracy plot of a run's metrics.jsonl; where a run went non-finite is shaded red."""

from __future__ import annotations

import json
from pathlib import Path


def plot_metrics(jsonl: str | Path, png: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line.strip()]
    train = [r for r in records if r["split"] == "train"]
    test = [r for r in records if r["split"] == "test"]
    nonfinite = [r for r in records if r["split"] == "nonfinite"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["step"] for r in train], [r["lm_loss"] for r in train], label="LM loss")
    ax_loss.plot([r["step"] for r in train], [r["halt_loss"] for r in train], label="halting loss")
    ax_loss.set(xlabel="optimizer step", ylabel="loss per example", yscale="log", title="training loss")
    halted = [r for r in train if r.get("accuracy") is not None]  # a window where none halted has no accuracy
    ax_acc.plot([r["step"] for r in halted], [r["accuracy"] for r in halted], label="train token acc (halted)")
    ax_acc.plot([r["step"] for r in halted], [r["exact_accuracy"] for r in halted], label="train exact acc (halted)")
    if test:
        ax_acc.plot([r["step"] for r in test], [r["exact_accuracy"] for r in test], "o-", label="test exact acc")
    ax_acc.set(xlabel="optimizer step", ylabel="accuracy", ylim=(0, 1.02), title="accuracy")
    for ax in (ax_loss, ax_acc):
        for r in nonfinite:  # the window in which the loss, the gradients or the state became NaN or infinite
            first = r.get("first_step")
            where = f"at step {first}" if first is not None else f"in steps {r['from_step']}-{r['step']}"
            ax.axvspan(r["from_step"] - 1, r["step"], color="red", alpha=0.15)
            ax.axvline(r["step"] if first is None else first, color="red", linestyle="--", label=f"non-finite {where}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return Path(png)
