"""``python -m g2gserve.bench.wide --out runs/wide``: a wide random-initialised G2GNet, checkpointed and exported.

Why: in the demo model (hidden 1024) the weights are a few MB, so the serving process's own footprint hides what
the sparse format saves. At hidden 4096 the dense twin's weights are ~140 MB and the saving dominates the process.
The model is untrained (memory does not depend on the weights' values); it is written by the project's checkpoint
code (``model.pt``) and exported by the normal exporter, parity gate included, like any trained model.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]


def build_wide(out: str | Path, hidden: int = 4096, layers: int = 3, seed: int = 0, overwrite: bool = False) -> Path:
    """Write ``out/model.pt`` (default sparsity, groups and block size; ``layers`` hidden layers of ``hidden``
    units) and export it to ``out/export``; returns the export directory."""
    import torch

    from g2gserve.data.preprocess import Preprocess
    from g2gserve.export import export_checkpoint
    from g2gserve.model.checkpoint import from_model, save_checkpoint
    from g2gserve.model.config import ModelConfig
    from g2gserve.model.g2gnet import build_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = build_model(ModelConfig(hidden=(hidden,) * layers, mask_seed=seed)).eval()
    # Fashion-MNIST's shape and statistics, so real test images (when installed) drive the parity gate
    ckpt = from_model(model, FASHION_CLASSES, Preprocess(1, 28, 28, (0.2860,), (0.3530,)), seed=seed,
                      meta={"dataset": "fashion-mnist", "note": f"random-initialised, hidden {hidden}"})
    save_checkpoint(out / "model.pt", ckpt)
    export_checkpoint(out / "model.pt", out / "export", overwrite=overwrite)
    return out / "export"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m g2gserve.bench.wide", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/wide"))
    p.add_argument("--hidden", type=int, default=4096, help="units per hidden layer")
    p.add_argument("--layers", type=int, default=3, help="hidden layers")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(build_wide(args.out, args.hidden, args.layers, args.seed, overwrite=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
