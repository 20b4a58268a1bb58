"""Packed storage formats of a trained network, one class per format in a small registry.

``base``: ``PackedLayer`` / ``PackedNet`` (numpy arrays) and the ``LayerFormat`` interface;
``block``, ``csr``, ``dense``: the formats (``block`` defines the block layout); ``encoder``: the patch
encoder; ``packing``: model -> ``PackedNet`` and the dense twin (imports torch, lazily here);
``torch_layers``: their torch modules (imported by the torch runtime only).
"""
from __future__ import annotations

from g2gserve.formats.base import REGISTRY, LayerFormat, PackedLayer, PackedNet, densify, format_of, register  # noqa: F401
from g2gserve.formats import block, csr, dense  # noqa: F401  (register the formats)

_PACKING = ("pack_model", "choose_format", "FORMAT_CHOICES", "BLOCK_MAX_DENSITY", "CSR_MAX_DENSITY")


def __getattr__(name: str):
    """``pack_model`` & co. come from ``formats.packing``, imported on first use (it needs torch)."""
    if name in _PACKING:
        from g2gserve.formats import packing
        return getattr(packing, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["REGISTRY", "LayerFormat", "PackedLayer", "PackedNet", "densify", "format_of", "register", *_PACKING]
