"""ONNX graphs of a ``PackedNet`` built node by node with standard ops only.

Building the graph directly (rather than tracing) keeps it exactly the ops we choose: a block-sparse
layer is Reshape -> Gather (over input *tiles*) -> Reshape -> Transpose -> MatMul -> Transpose ->
Reshape -> Add, whose initializers are only the live tiles, so file size and FLOPs shrink with
sparsity, and the batch axis stays dynamic. onnxruntime has no fast kernel for unstructured sparse
weights (sparse initializers are densified at load), so CSR layers are emitted as dense MatMuls.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from g2gserve.formats import PackedNet

DEFAULT_OPSET = 17
MIN_OPSET = 13


class _Graph:
    def __init__(self):
        self.nodes, self.inits, self._n = [], [], 0

    def const(self, name: str, array) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        self._n += 1
        out = f"{op_type.lower()}_{self._n}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"{op_type}_{self._n}", **attrs))
        return out


def _shape(g: _Graph, name: str, dims: list[int]) -> str:
    return g.const(name, np.array(dims, dtype=np.int64))


def build_onnx(packed: PackedNet, opset: int = DEFAULT_OPSET, name: str = "g2gnet") -> onnx.ModelProto:
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old; use {MIN_OPSET} or newer")
    g = _Graph()
    p = packed.patch_size
    h = g.op("Conv", ["input", g.const("encoder.weight", packed.conv_weight.numpy()),
                      g.const("encoder.bias", packed.conv_bias.numpy())], kernel_shape=[p, p], strides=[p, p])
    h = g.op("Relu", [h])
    h = g.op("Transpose", [h], perm=[0, 2, 3, 1])
    features = packed.layers[0].in_features if packed.layers else packed.head_weight.shape[1]
    h = g.op("Reshape", [h, _shape(g, "encoder.flat", [-1, features])])
    for layer in packed.layers:
        t, n = layer.tensors, layer.name
        if layer.format == "block":
            b = layer.block_size
            n_out_tiles, k = t["idx"].shape
            h = g.op("Reshape", [h, _shape(g, f"{n}.tile_shape", [-1, layer.in_features // b, b])])
            h = g.op("Gather", [h, g.const(f"{n}.idx", t["idx"].reshape(-1).numpy())], axis=1)
            h = g.op("Reshape", [h, _shape(g, f"{n}.row_shape", [-1, n_out_tiles, k * b])])
            h = g.op("Transpose", [h], perm=[1, 0, 2])
            h = g.op("MatMul", [h, g.const(f"{n}.blocks", t["blocks"].numpy())])
            h = g.op("Transpose", [h], perm=[1, 0, 2])
            h = g.op("Reshape", [h, _shape(g, f"{n}.out_shape", [-1, layer.out_features])])
        else:
            h = g.op("MatMul", [h, g.const(f"{n}.weight_t", layer.dense_weight().t().contiguous().numpy())])
        h = g.op("Add", [h, g.const(f"{n}.bias", t["bias"].numpy())])
        h = g.op("Relu", [h])
    h = g.op("MatMul", [h, g.const("head.weight_t", packed.head_weight.t().contiguous().numpy())])
    g.nodes.append(helper.make_node("Add", [h, g.const("head.bias", packed.head_bias.numpy())], ["logits"], name="Add_head"))
    c, size = packed.in_channels, packed.image_size
    graph = helper.make_graph(
        g.nodes, name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", c, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", packed.num_classes])],
        g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="g2gserve")
    model.ir_version = min(model.ir_version, 9)  # readable by older onnxruntime releases too
    onnx.checker.check_model(model, full_check=True)
    return model
