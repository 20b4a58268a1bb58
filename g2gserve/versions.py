"""Versions of g2gserve, Python and chosen libraries, recorded in checkpoints and manifests."""
from __future__ import annotations

import importlib
import platform

from g2gserve import __version__


def versions(*modules: str) -> dict[str, str]:
    """{"g2gserve", "python", and each of ``modules`` that is importable: its ``__version__``}."""
    out = {"g2gserve": __version__}
    for name in modules:
        try:
            out[name] = str(importlib.import_module(name).__version__)
        except ImportError:
            pass
    out["python"] = platform.python_version()
    return out
