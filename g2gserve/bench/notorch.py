"""``python -m g2gserve.bench.notorch MODULE [ARGS ...]``: run ``python -m MODULE ARGS`` where torch cannot be imported.

Why: to measure (or test) a slim serving process from the full install. ``sys.modules["torch"] = None`` makes
every ``import torch`` raise ImportError, so a code path that needed torch fails loudly instead of silently
adding torch's ~470 MiB to the figure; what remains is what a ``[serve]``-only install loads.
"""
from __future__ import annotations

import runpy
import sys


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python -m g2gserve.bench.notorch MODULE [ARGS ...]")
    sys.modules["torch"] = None  # type: ignore[assignment]
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
