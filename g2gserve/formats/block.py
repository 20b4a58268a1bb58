"""``block``: live b x b tiles only. The block layout is defined here and nowhere else:

* the layer's units are in group-sorted order (``formats.packing``), cut into tiles of ``b`` units;
  there are ``O = out/b`` output tiles ("tile-rows") and ``I = in/b`` input tiles;
* ``idx`` int64 [O, K]: ``idx[o, k]`` is the k-th live input tile of tile-row o, in increasing order;
  rows with fewer than K live tiles are padded with tile 0 and a zero weight tile;
* ``blocks`` float32 [O, K*b, b], input-unit-major: ``blocks[o, k*b + i, j]`` is the weight from
  input unit ``idx[o, k]*b + i`` to output unit ``o*b + j``;
* ``bias`` float32 [out].

So the layer is one gather of input *tiles* plus one batched matmul:
``y[:, o*b:(o+1)*b] = concat_k(x[:, idx[o, k]*b : +b]) @ blocks[o] + bias``.
"""
from __future__ import annotations

import numpy as np

from g2gserve.formats.base import FLOAT, INDEX, LayerFormat, PackedLayer, check_bias, check_tensor, register


def is_block_structured(mask: np.ndarray, b: int) -> bool:
    """Whether ``mask`` [out, in] is made of whole, aligned b x b tiles."""
    n_out, n_in = mask.shape
    if b < 1 or n_out % b or n_in % b:
        return False
    counts = mask.reshape(n_out // b, b, n_in // b, b).sum((1, 3))
    return bool(((counts == 0) | (counts == b * b)).all())


@register
class Block(LayerFormat):
    name = "block"
    tensor_names = ("blocks", "idx", "bias")

    def pack(self, name, weight, mask, bias, block_size, reason=""):
        b = block_size
        if mask is None or not is_block_structured(mask, b):
            raise ValueError(f"{name}: the mask is not made of whole {b}x{b} tiles; use csr or dense")
        n_out, n_in = weight.shape
        n_o, n_i = n_out // b, n_in // b
        live = mask.reshape(n_o, b, n_i, b).any(axis=(1, 3))  # [O, I]
        k = max(1, int(live.sum(1).max()))
        # live tiles first (in input order), padding after
        order = np.argsort(np.where(live, 0, n_i) + np.arange(n_i), axis=1, kind="stable")[:, :k]
        valid = np.take_along_axis(live, order, 1)
        idx = np.where(valid, order, 0).astype(np.int64)
        tiles = (weight * mask).reshape(n_o, b, n_i, b).transpose(0, 2, 3, 1)  # [o, i, b_in, b_out]
        blocks = tiles[np.arange(n_o)[:, None], idx] * valid[:, :, None, None]
        return PackedLayer(name, self.name, n_in, n_out,
                           {"blocks": np.ascontiguousarray(blocks.reshape(n_o, k * b, b), np.float32), "idx": idx,
                            "bias": np.array(bias, np.float32)},
                           float(mask.mean()), b, reason)

    def validate(self, layer):
        b, n_in, n_out = layer.block_size, layer.in_features, layer.out_features
        if b < 1 or n_in % b or n_out % b:
            raise ValueError(f"{layer.name}: block size {b} does not tile {n_out}x{n_in}")
        idx = check_tensor(layer, "idx", lambda s: len(s) == 2 and s[0] == n_out // b and s[1] >= 1, INDEX,
                           f"({n_out // b}, K)")
        k = idx.shape[1]
        check_tensor(layer, "blocks", (n_out // b, k * b, b), FLOAT)
        check_bias(layer)
        if int(idx.min()) < 0 or int(idx.max()) >= n_in // b:
            raise ValueError(f"{layer.name}.idx has tile indices outside [0, {n_in // b})")

    def dense_weight(self, layer):
        t, b = layer.tensors, layer.block_size
        n_o, k = t["idx"].shape
        w = np.zeros((n_o, layer.in_features // b, b, b), np.float32)  # [o, i, b_in, b_out]
        np.add.at(w, (np.arange(n_o)[:, None], t["idx"]), t["blocks"].reshape(n_o, k, b, b))  # padding adds zeros
        return np.ascontiguousarray(w.transpose(0, 3, 1, 2).reshape(layer.out_features, layer.in_features))

    def torch_module(self, layer):
        from g2gserve.formats.torch_layers import BlockSparseLayer
        return BlockSparseLayer(layer)

    def onnx_nodes(self, graph, layer, h):
        t, n, b = layer.tensors, layer.name, layer.block_size
        n_o, k = t["idx"].shape
        h = graph.op("Reshape", [h, graph.shape(f"{n}.tile_shape", [-1, layer.in_features // b, b])])
        h = graph.op("Gather", [h, graph.const(f"{n}.idx", t["idx"].reshape(-1))], axis=1)
        h = graph.op("Reshape", [h, graph.shape(f"{n}.row_shape", [-1, n_o, k * b])])
        h = graph.op("Transpose", [h], perm=[1, 0, 2])
        h = graph.op("MatMul", [h, graph.const(f"{n}.blocks", t["blocks"])])
        h = graph.op("Transpose", [h], perm=[1, 0, 2])
        h = graph.op("Reshape", [h, graph.shape(f"{n}.out_shape", [-1, layer.out_features])])
        return graph.op("Add", [h, graph.const(f"{n}.bias", t["bias"])])

    def fused_tiles(self, layer):
        b = layer.block_size
        return layer.tensors["blocks"], layer.tensors["idx"], b, b
