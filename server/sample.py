"""python -m server.sample --out sample.png: write a real test image as PNG (for curl and the demo)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from g2gserve.data.datasets import DATASETS, DataError, load_split
from g2gserve.data.images import encode_png


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m server.sample", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, default="fashion-mnist")
    p.add_argument("--data-dir", type=Path, default=None, help="as for training.fit")
    p.add_argument("--index", type=int, default=0, help="which test image")
    p.add_argument("--out", type=Path, default=Path("sample.png"))
    args = p.parse_args(argv)
    try:
        test = load_split(args.dataset, "test", args.data_dir)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not 0 <= args.index < len(test):
        p.error(f"--index must be in [0, {len(test)})")
    args.out.write_bytes(encode_png(test.x[args.index]))
    label = int(test.y[args.index])
    print(f"wrote {args.out}: {args.dataset} test image {args.index}, true label {label} ({test.classes[label]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
