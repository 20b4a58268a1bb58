"""``python tests/tiny_export.py DIR``: a tiny block-sparse checkpoint, its export, test images and the torch
backend's probabilities for them, in DIR (for ``make test-slim``, whose venv has no torch to make them)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from g2gserve.export import export_checkpoint  # noqa: E402
from g2gserve.runtime import load  # noqa: E402
from test_export import _checkpoint  # noqa: E402


def main(out: str) -> None:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    _, _, path = _checkpoint(out_dir, granularity="block")
    export_checkpoint(path, out_dir / "export", overwrite=True)
    images = np.random.default_rng(0).integers(0, 256, (5, 1, 28, 28), dtype=np.uint8)
    np.save(out_dir / "images.npy", images)
    np.save(out_dir / "expected.npy", load(out_dir / "export", backend="torch").predict(images))  # the reference
    print(out_dir / "export")


if __name__ == "__main__":
    main(sys.argv[1])
