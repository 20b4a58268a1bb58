"""Datasets as in-memory uint8 tensors, from torchvision, Fashion-MNIST idx files, or ``.npz`` files.

Everything here fits in memory (at most 50k x 3 x 32 x 32 bytes), so batches are cut from tensors
and augmented in torch, on the training device: no DataLoader workers, identical on CPU and CUDA,
reproducible by generator. ``REGISTRY`` holds every fact about a data set (shape, classes, augmentation).

Sources, in order:

* ``data_dir`` given: the four original idx files (``train-images-idx3-ubyte[.gz]`` ...) or
  ``train.npz``/``test.npz`` (``x`` uint8 N x H x W x C or N x H x W, ``y`` int; optional
  ``classes.json``), in ``data_dir`` or ``data_dir/<dataset>``. Nothing is downloaded.
* no ``data_dir``: for Fashion-MNIST the Debian package directory when present, else torchvision's
  download into ``~/.cache/g2gserve/data`` (``$G2G_DATA`` overrides).
"""
from __future__ import annotations

import gzip
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch



@dataclass(frozen=True)
class DatasetInfo:
    """What the rest of the project needs to know about a data set before reading a byte of it."""

    name: str
    channels: int
    image_size: int
    num_classes: int
    augment: bool  # crop + flip by default (CIFAR recipe); Fashion-MNIST trains on the plain images
    torchvision: str  # class in torchvision.datasets


# The one data-set registry: shapes, classes, default augmentation, download source.
REGISTRY = {d.name: d for d in (
    DatasetInfo("fashion-mnist", 1, 28, 10, False, "FashionMNIST"),
    DatasetInfo("cifar10", 3, 32, 10, True, "CIFAR10"),
    DatasetInfo("cifar100", 3, 32, 100, True, "CIFAR100"),
)}
DATASETS = tuple(REGISTRY)


def dataset_info(name: str) -> DatasetInfo:
    if name not in REGISTRY:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return REGISTRY[name]


DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


class DataError(RuntimeError):
    """The data set could not be found or read; the message says where we looked and what to do."""


@dataclass
class ImageSet:
    x: torch.Tensor  # uint8 (N, C, H, W)
    y: torch.Tensor  # int64 (N,)
    classes: list[str]

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device | str) -> "ImageSet":
        """The same images on ``device`` (a whole data set is at most 150 MB: it lives on the GPU)."""
        return ImageSet(self.x.to(device), self.y.to(device), self.classes)


def default_cache() -> Path:
    return Path(os.environ.get("G2G_DATA", Path.home() / ".cache" / "g2gserve" / "data"))


# ---------------------------------------------------------------- readers
def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: Path) -> np.ndarray:
    """Read one idx file (the original MNIST/Fashion-MNIST format), gzipped or not."""
    try:
        with _open(path) as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read idx file ({e})") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path}: not an idx file of unsigned bytes")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path}: truncated idx file ({body.size} bytes for shape {shape})")
    return body.reshape(shape)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def _to_nchw(x: np.ndarray, source: Path) -> torch.Tensor:
    if x.dtype != np.uint8:
        raise DataError(f"{source}: images must be uint8, got {x.dtype}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise DataError(f"{source}: images must be N x H x W [x C], got shape {x.shape}")
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def _labels(y: np.ndarray, n: int, source: Path) -> torch.Tensor:
    if y.ndim != 1 or len(y) != n or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{source}: labels must be {n} integers, got {y.dtype} {y.shape}")
    return torch.from_numpy(y.astype(np.int64))


def _read_idx_split(directory: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    img_stem, lbl_stem = _IDX_FILES[split]
    img, lbl = _find_idx(directory, img_stem), _find_idx(directory, lbl_stem)
    x = read_idx(img)
    return _to_nchw(x, img), _labels(read_idx(lbl), len(x), lbl)


def _read_npz_split(directory: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    path = directory / f"{split}.npz"
    try:
        with np.load(path, allow_pickle=False) as f:
            x, y = f["x"], f["y"]
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{path}: cannot read (need arrays 'x' and 'y'; {e})") from e
    return _to_nchw(x, path), _labels(y, len(x), path)


def _classes(directory: Path | None, name: str, n: int) -> list[str]:
    if directory is not None and (directory / "classes.json").is_file():
        classes = json.loads((directory / "classes.json").read_text())
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise DataError(f"{directory / 'classes.json'}: must be a JSON list of strings")
        return classes
    if name == "fashion-mnist" and n == 10:
        return list(FASHION_MNIST_CLASSES)
    return [str(i) for i in range(n)]


# ---------------------------------------------------------------- sources
def _local_source(data_dir: Path, name: str) -> tuple[str, Path] | None:
    for directory in (data_dir, data_dir / name):
        if all(_find_idx(directory, stem) for pair in _IDX_FILES.values() for stem in pair):
            return "idx", directory
        if all((directory / f"{s}.npz").is_file() for s in ("train", "test")):
            return "npz", directory
    return None


def _how_to_get(name: str) -> str:
    if name == "fashion-mnist":
        return ("get it with `apt-get install dataset-fashion-mnist` (then --data-dir "
                f"{DEBIAN_FASHION_MNIST}) or run without --data-dir to download it through torchvision")
    return ("write train.npz/test.npz there (e.g. `python ../shared/data/cifar.py unpack DIR`) "
            "or run without --data-dir to download it through torchvision")


def load_split(name: str, split: str, data_dir: str | os.PathLike | None = None, download: bool = True) -> ImageSet:
    """One split (``train`` or ``test``) of a data set as uint8 tensors with class names."""
    info = dataset_info(name)
    if split not in _IDX_FILES:
        raise DataError(f"unknown split {split!r}; choose train or test")
    if data_dir is None and name == "fashion-mnist" and _local_source(DEBIAN_FASHION_MNIST, name):
        data_dir = DEBIAN_FASHION_MNIST
    if data_dir is not None:
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise DataError(f"--data-dir {data_dir} does not exist or is not a directory; {_how_to_get(name)}")
        found = _local_source(data_dir, name)
        if found is None:
            raise DataError(
                f"no {name} data in {data_dir} or {data_dir / name}: looked for the four idx files "
                f"(train-images-idx3-ubyte.gz, ...) and for train.npz + test.npz; {_how_to_get(name)}")
        kind, directory = found
        x, y = (_read_idx_split if kind == "idx" else _read_npz_split)(directory, split)
        return ImageSet(x, y, _classes(directory if kind == "npz" else None, name, max(info.num_classes, int(y.max()) + 1)))
    if not download:
        raise DataError(f"no --data-dir given and downloading is off; {_how_to_get(name)}")
    return _torchvision_split(name, split)


def _torchvision_split(name: str, split: str) -> ImageSet:
    import torchvision

    cls = getattr(torchvision.datasets, dataset_info(name).torchvision)
    root = default_cache()
    try:
        ds = cls(root=str(root), train=(split == "train"), download=True)
    except Exception as e:  # torchvision raises URLError, RuntimeError, ... when offline
        raise DataError(f"could not download {name} into {root} ({e}); {_how_to_get(name)}") from e
    data = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else ds.data
    return ImageSet(_to_nchw(np.asarray(data), root), torch.as_tensor(ds.targets, dtype=torch.int64), list(ds.classes))


# ---------------------------------------------------------------- batches
def crop_flip(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Crop each zero-padded image at offset (dy, dx) and flip it where ``flip``, vectorised, on x's device."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = dy[:, None] + torch.arange(h, device=x.device)
    cols = dx[:, None] + torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    idx_n = torch.arange(n, device=x.device)[:, None, None, None]
    idx_c = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[idx_n, idx_c, rows[:, None, :, None], cols[:, None, None, :]]


def draw_crop_flip(n: int, generator: torch.Generator, pad: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crop offsets and flips for ``n`` images (CPU generator, so CPU and CUDA runs draw alike)."""
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    return dy, dx, torch.rand(n, generator=generator) < 0.5


def augment_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding ``pad`` plus horizontal flip, per image (CIFAR recipe)."""
    return crop_flip(x, *(t.to(x.device) for t in draw_crop_flip(len(x), generator, pad)), pad=pad)


def batches(data: ImageSet, batch_size: int, generator: torch.Generator | None = None, augment: bool = False,
            rank: int = 0, world: int = 1):
    """Yield (uint8 images, labels) on the data's device; shuffled and augmented when a generator is given.

    The epoch's randomness (order, crops, flips) is drawn up front and moved to the device once, so a
    CUDA epoch has no host-to-device copy (and so no stream synchronisation) per batch. With ``world``
    > 1 each global batch is split into ``world`` contiguous shards and this yields shard ``rank``:
    together the ranks see exactly the batches (and augmentations) of a single process.
    """
    n, device = len(data), data.x.device
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    crops = draw_crop_flip(n, generator) if augment and generator is not None else None
    order = order.to(device)
    crops = None if crops is None else tuple(t.to(device) for t in crops)
    for start in range(0, n, batch_size):
        pos = torch.arange(start, min(start + batch_size, n), device=device)
        if world > 1:
            pos = torch.tensor_split(pos, world)[rank]
        idx = order[pos]
        x = data.x[idx]
        if crops is not None:
            x = crop_flip(x, *(t[pos] for t in crops))
        yield x, data.y[idx]
