"""Pictures of a training run: accuracy per epoch and, with DST, how the wiring evolves."""
from __future__ import annotations

from pathlib import Path

from g2gserve.plotting import plt, save_png


def plot_training(history: list[dict], dst_records: list[dict], path: Path) -> None:
    panels = 2 if dst_records else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    ax = axes[0][0]
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [100 * h["test_acc"] for h in history], "o-", label="test")
    ax.plot(epochs, [100 * h["train_acc"] for h in history], "s--", label="train")
    ax.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    if dst_records:
        ax = axes[0][1]
        for layer in sorted({r["layer"] for r in dst_records}):
            rs = [r for r in dst_records if r["layer"] == layer]
            steps = [r["step"] for r in rs]
            line, = ax.plot(steps, [100 * r["intra_fraction"] for r in rs], "o-", label=f"hidden.{layer} intra-group")
            ax.plot(steps, [100 * r["turnover"] for r in rs], "x--", color=line.get_color(),
                    label=f"hidden.{layer} turnover")
        ax.set(xlabel="optimizer step", ylabel="% of live edges", title="wiring under dynamic sparse training")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)
