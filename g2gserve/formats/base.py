"""What every packed format shares: the layer record, the network record, the format interface, the registry.

Everything here is numpy: reading and validating a bundle, and running it with onnxruntime or the fused
backend, needs no torch. Format classes import torch (``torch_module``) only when asked for.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import numpy as np

FLOAT, INDEX = np.dtype(np.float32), np.dtype(np.int64)


@dataclass
class PackedLayer:
    """One hidden layer as stored: ``tensors`` always holds "bias"; the rest is its format's schema."""

    name: str
    format: str
    in_features: int
    out_features: int
    tensors: dict[str, np.ndarray]
    density: float
    block_size: int = 0
    reason: str = ""

    @property
    def spec(self) -> "LayerFormat":
        return format_of(self.format)

    @property
    def stored_bytes(self) -> int:
        return sum(int(t.nbytes) for t in self.tensors.values())

    @property
    def dense_bytes(self) -> int:
        return (self.in_features * self.out_features + self.out_features) * 4

    def dense_weight(self) -> np.ndarray:
        """The [out, in] float32 weight this layer computes with (for the dense twin and for checks)."""
        return self.spec.dense_weight(self)


@dataclass
class PackedNet:
    """Everything inference needs, as numpy arrays, in group-sorted unit order.

    ``unit_orders[k]`` is the permutation applied to unit set k (encoder output first): packed unit j is
    the model's unit ``unit_orders[k][j]``. It is recorded (manifest) so a bundle can be mapped back to
    the trained model; inference never needs it.
    """

    in_channels: int
    image_size: int
    patch_size: int
    num_classes: int
    conv_weight: np.ndarray   # [channels, in_channels, p, p]
    conv_bias: np.ndarray     # [channels]
    layers: list[PackedLayer]
    head_weight: np.ndarray   # [classes, last width]
    head_bias: np.ndarray     # [classes]
    unit_orders: list[np.ndarray] = field(default_factory=list)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.image_size, self.image_size)


class LayerFormat:
    """One packed storage format: its tensors, their validation, and how each runtime executes it.

    A new format is one subclass registered with ``@register``; nothing else switches on format names.
    """

    name: ClassVar[str]
    tensor_names: ClassVar[tuple[str, ...]]

    def pack(self, name: str, weight: np.ndarray, mask: np.ndarray | None, bias: np.ndarray, block_size: int,
             reason: str = "") -> PackedLayer:
        """Pack a group-sorted [out, in] weight (masked entries are dropped) and its bias."""
        raise NotImplementedError

    def validate(self, layer: PackedLayer) -> None:
        """Raise ValueError naming the tensor when ``layer.tensors`` does not fit this format's schema."""
        raise NotImplementedError

    def dense_weight(self, layer: PackedLayer) -> np.ndarray:
        raise NotImplementedError

    def torch_module(self, layer: PackedLayer):
        """A torch ``nn.Module`` computing ``x @ W.T + bias`` from the stored tensors (imports torch)."""
        raise NotImplementedError

    def onnx_nodes(self, graph, layer: PackedLayer, h: str) -> str:
        """Append the nodes computing ``h @ W.T + bias`` to ``graph`` (``const``/``op`` builder); returns the output."""
        raise NotImplementedError

    def fused_tiles(self, layer: PackedLayer) -> tuple[np.ndarray, np.ndarray, int, int]:
        """What the fused backend needs: ``(blocks [O, K*t_in, t_out] input-unit-major, idx [O, K] int64,
        t_in, t_out)``, output tile o reading input tiles ``idx[o]`` of ``t_in`` units each."""
        raise NotImplementedError


REGISTRY: dict[str, LayerFormat] = {}


def register(cls: type[LayerFormat]) -> type[LayerFormat]:
    REGISTRY[cls.name] = cls()
    return cls


def format_of(name: str) -> LayerFormat:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown layer format {name!r}; known: {', '.join(REGISTRY)}") from None


def check_tensor(layer: PackedLayer, key: str, shape: tuple[int, ...] | Callable[[tuple], bool], dtype: np.dtype,
                 expected: str = "") -> np.ndarray:
    """The tensor ``layer.name.key``, or ValueError saying what is missing or wrong about it."""
    t = layer.tensors.get(key)
    if t is None:
        raise ValueError(f"missing tensor {layer.name}.{key}")
    ok = shape(tuple(t.shape)) if callable(shape) else tuple(t.shape) == shape
    if not ok or t.dtype != dtype:
        raise ValueError(f"{layer.name}.{key} has shape {tuple(t.shape)} ({t.dtype}), expected {expected or shape} ({dtype})")
    return t


def check_bias(layer: PackedLayer) -> np.ndarray:
    return check_tensor(layer, "bias", (layer.out_features,), FLOAT)


def densify(packed: PackedNet) -> PackedNet:
    """The dense twin: the same function with every hidden layer stored dense (zeros included)."""
    dense = format_of("dense")
    layers = [dense.pack(l.name, l.dense_weight(), None, l.tensors["bias"], 0, "dense twin") for l in packed.layers]
    return PackedNet(packed.in_channels, packed.image_size, packed.patch_size, packed.num_classes,
                     packed.conv_weight, packed.conv_bias, layers, packed.head_weight, packed.head_bias,
                     list(packed.unit_orders))
