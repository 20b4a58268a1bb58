"""How raw pixels become model input. Stored in every checkpoint so serving matches training exactly."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@lru_cache(maxsize=32)
def _torch_stats(mean: tuple[float, ...], std: tuple[float, ...], device):
    """mean/std as (1, C, 1, 1) tensors on ``device``, made once: copying them from host memory at every
    training step would synchronise the CUDA stream each step."""
    import torch
    return (torch.tensor(mean, device=device).view(1, -1, 1, 1), torch.tensor(std, device=device).view(1, -1, 1, 1))


@dataclass(frozen=True)
class Preprocess:
    """uint8 images (N, C, H, W) -> float (x / 255 - mean) / std, per channel."""

    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean/std need {self.channels} values, got {len(self.mean)}/{len(self.std)}")
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    def __call__(self, images):
        """numpy in, float32 numpy out (serving, no torch); a torch tensor in (training, any device), a tensor out."""
        if len(images.shape) != 4 or tuple(images.shape[1:]) != self.input_shape:
            raise ValueError(f"expected images of shape (N, {self.channels}, {self.height}, {self.width}), got {tuple(images.shape)}")
        if not isinstance(images, np.ndarray) and type(images).__module__.startswith("torch"):
            mean, std = _torch_stats(self.mean, self.std, images.device)
            return (images.float() / 255.0 - mean) / std
        mean = np.array(self.mean, np.float32).reshape(1, -1, 1, 1)
        std = np.array(self.std, np.float32).reshape(1, -1, 1, 1)
        return (np.asarray(images).astype(np.float32) / np.float32(255.0) - mean) / std

    def to_dict(self) -> dict:
        return {"input_shape": list(self.input_shape), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        c, h, w = (int(v) for v in d["input_shape"])
        return cls(c, h, w, tuple(d["mean"]), tuple(d["std"]))

    @classmethod
    def fit(cls, images) -> "Preprocess":
        """Per-channel mean/std of a uint8 (N, C, H, W) training set (a torch tensor)."""
        import torch
        n, c, h, w = images.shape
        total = torch.zeros(c, dtype=torch.float64)
        squares = torch.zeros(c, dtype=torch.float64)
        for chunk in images.split(4096):  # bounded memory on 50k x 3072 CIFAR
            x = chunk.to(torch.float64).div_(255.0)
            total += x.sum((0, 2, 3))
            squares += x.square().sum((0, 2, 3))
        count = n * h * w
        mean = total / count
        std = (squares / count - mean.square()).clamp(min=1e-12).sqrt()
        return cls(c, h, w, tuple(mean.tolist()), tuple(std.tolist()))
