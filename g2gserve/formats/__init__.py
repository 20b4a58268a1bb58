"""Compact storage of a trained network: each hidden layer as dense, block-sparse or CSR tensors.

Packing works in *group-sorted* unit order: every hidden unit set is reordered so that each group's
units are contiguous (``masks.tile_order``). Reordering layer k's outputs and layer k+1's inputs the
same way leaves the function unchanged, so groupings that interleave or shuffle units (``mixer``,
``random``) cost nothing at inference: no per-feature gather or permutation is left.

Formats of a hidden layer (conv and head are always dense: they are small and fully connected):

* ``block``: live b x b tiles only. ``idx[o, k]`` is the k-th live input tile of output tile-row o and
  ``blocks[o]`` stacks those tiles as a (K*b, b) matrix, so the layer is one gather of input *tiles*
  plus one batched matmul. Rows with fewer than K live tiles are padded with zero tiles.
* ``csr``: live weights of an unstructured mask with int32 row pointers and column indices.
* ``dense``: the (masked) weight matrix, for layers where sparse formats do not pay.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from g2gserve.model.masks import tile_order
from g2gserve.model.g2gnet import G2GNet, unit_groups

FORMATS = ("auto", "block", "csr", "dense")
# Break-even densities measured on CPU (shared/notes/sparse-inference.md): block-sparse gather+bmm
# beats dense below ~50% density; CSR only below ~10-15%.
BLOCK_MAX_DENSITY = 0.5
CSR_MAX_DENSITY = 0.10


@dataclass
class PackedLayer:
    name: str
    format: str
    in_features: int
    out_features: int
    tensors: dict[str, torch.Tensor]  # always "bias"; dense: "weight"; block: "blocks", "idx"; csr: "crow", "col", "values"
    density: float
    block_size: int = 0
    reason: str = ""

    @property
    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def dense_bytes(self) -> int:
        return (self.in_features * self.out_features + self.out_features) * 4

    def dense_weight(self) -> torch.Tensor:
        """The [out, in] weight this layer computes with (for the dense twin and for checks)."""
        t = self.tensors
        if self.format == "dense":
            return t["weight"]
        if self.format == "csr":
            rows = torch.repeat_interleave(torch.arange(self.out_features), torch.diff(t["crow"].long()))
            w = torch.zeros(self.out_features, self.in_features)
            w[rows, t["col"].long()] = t["values"]
            return w
        b = self.block_size
        n_out_tiles, k = t["idx"].shape
        w = torch.zeros(n_out_tiles, self.in_features // b, b, b)  # [o, i, b_in, b_out]
        tiles = t["blocks"].view(n_out_tiles, k, b, b)
        w.index_put_((torch.arange(n_out_tiles)[:, None].expand(-1, k), t["idx"]), tiles, accumulate=True)
        return w.permute(0, 3, 1, 2).reshape(self.out_features, self.in_features)


@dataclass
class PackedNet:
    """Everything inference needs, as plain tensors, in group-sorted unit order."""

    in_channels: int
    image_size: int
    patch_size: int
    num_classes: int
    conv_weight: torch.Tensor
    conv_bias: torch.Tensor
    layers: list[PackedLayer]
    head_weight: torch.Tensor
    head_bias: torch.Tensor
    extra: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.image_size, self.image_size)


def _is_block_structured(mask: torch.Tensor, b: int) -> bool:
    n_out, n_in = mask.shape
    if b < 1 or n_out % b or n_in % b:
        return False
    counts = mask.view(n_out // b, b, n_in // b, b).sum((1, 3))
    return bool(((counts == 0) | (counts == b * b)).all())


def pack_block(name: str, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor, b: int, reason: str = "") -> PackedLayer:
    n_out, n_in = weight.shape
    if not _is_block_structured(mask, b):
        raise ValueError(f"{name}: the mask is not made of whole {b}x{b} tiles; use csr or dense")
    n_out_tiles, n_in_tiles = n_out // b, n_in // b
    live = mask.view(n_out_tiles, b, n_in_tiles, b).any(3).any(1)  # [o, i]
    k = max(1, int(live.sum(1).max()))
    # live tiles first (in input order), padding after; padding points at tile 0 with zero weights
    order = torch.sort((~live).to(torch.int8) * n_in_tiles + torch.arange(n_in_tiles), dim=1).indices[:, :k]
    valid = torch.gather(live, 1, order)
    idx = torch.where(valid, order, torch.zeros_like(order))
    tiles = (weight * mask).view(n_out_tiles, b, n_in_tiles, b).permute(0, 2, 3, 1)  # [o, i, b_in, b_out]
    blocks = tiles[torch.arange(n_out_tiles)[:, None], idx] * valid[:, :, None, None]
    return PackedLayer(name, "block", n_in, n_out,
                       {"blocks": blocks.reshape(n_out_tiles, k * b, b).contiguous(), "idx": idx.long().contiguous(),
                        "bias": bias.clone()},
                       float(mask.float().mean()), b, reason)


def pack_csr(name: str, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor, reason: str = "") -> PackedLayer:
    n_out, n_in = weight.shape
    rows, cols = mask.nonzero(as_tuple=True)
    crow = torch.zeros(n_out + 1, dtype=torch.int32)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=n_out), 0).to(torch.int32)
    return PackedLayer(name, "csr", n_in, n_out,
                       {"crow": crow, "col": cols.to(torch.int32), "values": weight[rows, cols].contiguous(),
                        "bias": bias.clone()},
                       float(mask.float().mean()), 0, reason)


def pack_dense(name: str, weight: torch.Tensor, mask: torch.Tensor | None, bias: torch.Tensor, reason: str = "") -> PackedLayer:
    w = weight if mask is None else weight * mask
    density = 1.0 if mask is None else float(mask.float().mean())
    return PackedLayer(name, "dense", weight.shape[1], weight.shape[0], {"weight": w.contiguous(), "bias": bias.clone()},
                       density, 0, reason)


def choose_format(mask: torch.Tensor | None, block_size: int) -> tuple[str, str]:
    """What ``auto`` picks for one hidden layer, and why (written to the manifest)."""
    if mask is None:
        return "dense", "dense layer"
    density = float(mask.float().mean())
    if block_size and _is_block_structured(mask, block_size):
        if density <= BLOCK_MAX_DENSITY:
            return "block", f"whole {block_size}x{block_size} tiles, density {density:.3f} <= {BLOCK_MAX_DENSITY} break-even"
        return "dense", f"block-structured but density {density:.3f} > {BLOCK_MAX_DENSITY}: dense is faster"
    if density <= CSR_MAX_DENSITY:
        return "csr", f"unstructured, density {density:.3f} <= {CSR_MAX_DENSITY}: CSR pays"
    return "dense", f"unstructured, density {density:.3f} > {CSR_MAX_DENSITY}: CSR is slower than dense on CPU"


@torch.no_grad()
def pack_model(model: G2GNet, fmt: str = "auto") -> PackedNet:
    """Pack a trained model (eval mode, CPU) into compact per-layer formats, permutations folded."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    cfg = model.cfg
    model = model.cpu()
    n_sets = len(model.hidden) + 1
    if cfg.is_sparse:
        orders = [tile_order(g) for g in unit_groups(cfg)]
    else:
        orders = [torch.arange(model.hidden[0].in_features)] + [torch.arange(l.out_features) for l in model.hidden]
    assert len(orders) == n_sets
    block = cfg.block_size if (cfg.is_sparse and cfg.granularity == "block") else 0
    layers = []
    for k, layer in enumerate(model.hidden):
        o_out, o_in = orders[k + 1], orders[k]
        w = layer.weight.detach()[o_out][:, o_in]
        mask = None if layer.mask is None else layer.mask[o_out][:, o_in]
        bias = layer.bias.detach()[o_out]
        name = f"hidden.{k}"
        if fmt == "auto":
            chosen, reason = choose_format(mask, block)
        else:
            chosen, reason = fmt, f"--format {fmt}"
        if chosen != "dense" and mask is None:
            raise ValueError(f"{name} is dense (model {cfg.kind}); --format {fmt} needs a sparse model")
        if chosen == "block":
            layers.append(pack_block(name, w, mask, bias, block or cfg.block_size, reason))
        elif chosen == "csr":
            layers.append(pack_csr(name, w, mask, bias, reason))
        else:
            layers.append(pack_dense(name, w, mask, bias, reason))
    conv = model.encoder.conv
    return PackedNet(cfg.in_channels, cfg.image_size, cfg.patch_size, cfg.num_classes,
                     conv.weight.detach().clone(), conv.bias.detach().clone(), layers,
                     model.head.weight.detach()[:, orders[-1]].contiguous(), model.head.bias.detach().clone())


def densify(packed: PackedNet) -> PackedNet:
    """The dense twin: the same function with every hidden layer stored dense (zeros included)."""
    layers = [pack_dense(l.name, l.dense_weight(), None, l.tensors["bias"], "dense twin") for l in packed.layers]
    return PackedNet(packed.in_channels, packed.image_size, packed.patch_size, packed.num_classes,
                     packed.conv_weight, packed.conv_bias, layers, packed.head_weight, packed.head_bias, dict(packed.extra))
