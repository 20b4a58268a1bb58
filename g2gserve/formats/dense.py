"""``dense``: the (masked) [out, in] weight, for layers where sparse formats do not pay, and the dense twin."""
from __future__ import annotations

import numpy as np

from g2gserve.formats.base import FLOAT, LayerFormat, PackedLayer, check_bias, check_tensor, register


def dense_onnx_nodes(graph, name: str, weight: np.ndarray, bias: np.ndarray, h: str) -> str:
    """``h @ weight.T + bias`` as MatMul + Add (also used for CSR, which stock onnxruntime cannot run sparse)."""
    h = graph.op("MatMul", [h, graph.const(f"{name}.weight_t", np.ascontiguousarray(weight.T))])
    return graph.op("Add", [h, graph.const(f"{name}.bias", bias)])


def dense_fused_tiles(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """A dense [out, in] weight as one output tile reading one input tile that spans all inputs."""
    n_out, n_in = weight.shape
    return np.ascontiguousarray(weight.T)[None], np.zeros((1, 1), np.int64), n_in, n_out


@register
class Dense(LayerFormat):
    name = "dense"
    tensor_names = ("weight", "bias")

    def pack(self, name, weight, mask, bias, block_size=0, reason=""):
        w = weight if mask is None else weight * mask
        density = 1.0 if mask is None else float(mask.mean())
        return PackedLayer(name, self.name, weight.shape[1], weight.shape[0],
                           {"weight": np.ascontiguousarray(w, np.float32), "bias": np.array(bias, np.float32)},
                           density, 0, reason)

    def validate(self, layer):
        check_tensor(layer, "weight", (layer.out_features, layer.in_features), FLOAT)
        check_bias(layer)

    def dense_weight(self, layer):
        return layer.tensors["weight"]

    def torch_module(self, layer):
        from g2gserve.formats.torch_layers import DenseLayer
        return DenseLayer(layer)

    def onnx_nodes(self, graph, layer, h):
        return dense_onnx_nodes(graph, layer.name, layer.tensors["weight"], layer.tensors["bias"], h)

    def fused_tiles(self, layer):
        return dense_fused_tiles(layer.tensors["weight"])
