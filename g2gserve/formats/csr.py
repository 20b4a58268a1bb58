"""``csr``: the live weights of an unstructured mask with int32 row pointers and column indices.

Tensors: ``crow`` int32 [out + 1] (row r's entries are ``crow[r]:crow[r+1]``), ``col`` int32 [nnz],
``values`` float32 [nnz], ``bias``. Pays only at very low density (below ~10% on CPU); the ONNX graph and
the fused backend run it densified (stock onnxruntime has no fast unstructured kernel).
"""
from __future__ import annotations

import numpy as np

from g2gserve.formats.base import FLOAT, LayerFormat, PackedLayer, check_bias, check_tensor, register
from g2gserve.formats.dense import dense_fused_tiles, dense_onnx_nodes

INT32 = np.dtype(np.int32)


@register
class CSR(LayerFormat):
    name = "csr"
    tensor_names = ("crow", "col", "values", "bias")

    def pack(self, name, weight, mask, bias, block_size=0, reason=""):
        if mask is None:
            raise ValueError(f"{name} is dense; csr needs a sparse model")
        n_out, n_in = weight.shape
        rows, cols = np.nonzero(mask)  # row-major: sorted by row, then column
        crow = np.zeros(n_out + 1, np.int32)
        crow[1:] = np.cumsum(np.bincount(rows, minlength=n_out))
        return PackedLayer(name, self.name, n_in, n_out,
                           {"crow": crow, "col": cols.astype(np.int32), "values": weight[rows, cols].astype(np.float32),
                            "bias": np.array(bias, np.float32)},
                           float(mask.mean()), 0, reason)

    def validate(self, layer):
        n = layer.name
        crow = check_tensor(layer, "crow", (layer.out_features + 1,), INT32)
        nnz = int(crow[-1])
        col = check_tensor(layer, "col", (nnz,), INT32, "(nnz = crow[-1],)")
        check_tensor(layer, "values", (nnz,), FLOAT, "(nnz = crow[-1],)")
        check_bias(layer)
        if int(crow[0]) != 0 or bool((crow[1:] < crow[:-1]).any()):
            raise ValueError(f"{n}: inconsistent CSR row pointers")
        if nnz and (int(col.min()) < 0 or int(col.max()) >= layer.in_features):
            raise ValueError(f"{n}.col has column indices outside [0, {layer.in_features})")

    def dense_weight(self, layer):
        t = layer.tensors
        w = np.zeros((layer.out_features, layer.in_features), np.float32)
        rows = np.repeat(np.arange(layer.out_features), np.diff(t["crow"]))
        w[rows, t["col"]] = t["values"]
        return w

    def torch_module(self, layer):
        from g2gserve.formats.torch_layers import CSRLayer
        return CSRLayer(layer)

    def onnx_nodes(self, graph, layer, h):
        return dense_onnx_nodes(graph, layer.name, self.dense_weight(layer), layer.tensors["bias"], h)

    def fused_tiles(self, layer):
        return dense_fused_tiles(self.dense_weight(layer))
