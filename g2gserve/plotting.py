"""Matplotlib without a display, and PNGs written atomically."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from g2gserve.fileio import atomic_write  # noqa: E402


def save_png(fig, path: Path, dpi: int = 110) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    plt.close(fig)


__all__ = ["plt", "save_png"]
