"""Small data made on the spot: tests never need ../shared or the network."""
from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from g2gserve.model.config import ModelConfig

TINY = dict(hidden=(64, 64), groups=4, conv_channels=8, block_size=8)
TINY_FLAGS = ["--hidden", "64,64", "--groups", "4", "--block-size", "8", "--batch-size", "32", "--no-progress"]


@pytest.fixture(autouse=True)
def _cores_restored():
    """g2g-bench pins its process to as many cores as threads (``pin_threads``); a test that runs it in process
    must not leave the rest of the session on one core."""
    import os
    saved = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    yield
    if saved is not None and os.sched_getaffinity(0) != saved:
        os.sched_setaffinity(0, saved)


def tiny_config(**kw) -> ModelConfig:
    return ModelConfig(**(TINY | kw))


def _images(rng, n, shape, classes):
    """Images whose class is visible (a bright bar at a class-dependent row), so a model can learn them."""
    y = rng.integers(0, classes, n)
    x = rng.integers(0, 60, (n, *shape), dtype=np.uint8)
    rows = (y * shape[0]) // classes
    for i in range(n):
        x[i, rows[i]:rows[i] + 2] = 250
    return x, y.astype(np.int64)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def idx_dir(tmp_path) -> Path:
    """Fashion-MNIST layout: the four original idx .gz files, 28x28 grey."""
    rng = np.random.default_rng(0)
    d = tmp_path / "fmnist"
    d.mkdir()
    for split, n, prefix in (("train", 256, "train"), ("test", 64, "t10k")):
        x, y = _images(rng, n, (28, 28), 10)
        write_idx(d / f"{prefix}-images-idx3-ubyte.gz", x)
        write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", y)
    return d


@pytest.fixture
def npz_dir(tmp_path) -> Path:
    """CIFAR layout as written by shared/data/cifar.py: DIR/cifar10/{train,test}.npz + classes.json."""
    rng = np.random.default_rng(1)
    d = tmp_path / "npz" / "cifar10"
    d.mkdir(parents=True)
    for split, n in (("train", 192), ("test", 64)):
        x, y = _images(rng, n, (32, 32, 3), 10)
        np.savez(d / f"{split}.npz", x=x, y=y)
    (d / "classes.json").write_text(json.dumps([f"class{i}" for i in range(10)]))
    return d.parent
