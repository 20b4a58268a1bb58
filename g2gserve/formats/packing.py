"""Trained model -> ``PackedNet``: the per-layer format choice and the packing (imports torch).

Packing works in *group-sorted* unit order: every hidden unit set is reordered so that each group's
units are contiguous (``masks.tile_order``). Reordering layer k's outputs and layer k+1's inputs the
same way leaves the function unchanged, so groupings that interleave or shuffle units (``mixer``,
``random``) cost nothing at inference: no per-feature gather or permutation is left.
The conv and the head are always dense: they are small and fully connected.
"""
from __future__ import annotations

import numpy as np
import torch

from g2gserve.formats.base import PackedNet, format_of
from g2gserve.formats.block import is_block_structured
from g2gserve.model.g2gnet import G2GNet
from g2gserve.model.masks import tile_order

FORMAT_CHOICES = ("auto", "block", "csr", "dense")
# Break-even densities measured on CPU (shared/notes/sparse-inference.md): block-sparse gather+bmm
# beats dense below ~50% density; CSR only below ~10-15%.
BLOCK_MAX_DENSITY = 0.5
CSR_MAX_DENSITY = 0.10


def choose_format(mask: np.ndarray | None, block_size: int) -> tuple[str, str]:
    """What ``auto`` picks for one hidden layer, and why (written to the manifest)."""
    if mask is None:
        return "dense", "dense layer"
    density = float(mask.mean())
    if block_size and is_block_structured(mask, block_size):
        if density <= BLOCK_MAX_DENSITY:
            return "block", f"whole {block_size}x{block_size} tiles, density {density:.3f} <= {BLOCK_MAX_DENSITY} break-even"
        return "dense", f"block-structured but density {density:.3f} > {BLOCK_MAX_DENSITY}: dense is faster"
    if density <= CSR_MAX_DENSITY:
        return "csr", f"unstructured, density {density:.3f} <= {CSR_MAX_DENSITY}: CSR pays"
    return "dense", f"unstructured, density {density:.3f} > {CSR_MAX_DENSITY}: CSR is slower than dense on CPU"


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


@torch.no_grad()
def pack_model(model: G2GNet, fmt: str = "auto") -> PackedNet:
    """Pack a trained model (eval mode, CPU) into compact per-layer formats, permutations folded."""
    if fmt not in FORMAT_CHOICES:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMAT_CHOICES)}")
    cfg = model.cfg
    model = model.cpu()
    if cfg.is_sparse:
        if model.groups is None:
            raise ValueError("a sparse model without unit groups cannot be packed (build it with build_model or "
                             "load it from a checkpoint)")
        orders = [tile_order(g.cpu()).numpy() for g in model.groups]
    else:
        orders = [np.arange(model.hidden[0].in_features)] + [np.arange(l.out_features) for l in model.hidden]
    block = cfg.block_size if (cfg.is_sparse and cfg.granularity == "block") else 0
    layers = []
    for k, layer in enumerate(model.hidden):
        o_out, o_in = orders[k + 1], orders[k]
        w = _np(layer.weight)[o_out][:, o_in]
        mask = None if layer.mask is None else _np(layer.mask)[o_out][:, o_in]
        bias = _np(layer.bias)[o_out]
        name = f"hidden.{k}"
        chosen, reason = choose_format(mask, block) if fmt == "auto" else (fmt, f"--format {fmt}")
        if chosen != "dense" and mask is None:
            raise ValueError(f"{name} is dense (model {cfg.kind}); --format {fmt} needs a sparse model")
        layers.append(format_of(chosen).pack(name, w, mask, bias, block or cfg.block_size, reason))
    conv = model.encoder.conv
    return PackedNet(cfg.in_channels, cfg.image_size, cfg.patch_size, cfg.num_classes, _np(conv.weight),
                     _np(conv.bias), layers, np.ascontiguousarray(_np(model.head.weight)[:, orders[-1]]),
                     _np(model.head.bias), [o.astype(np.int64) for o in orders])

