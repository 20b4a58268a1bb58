"""ONNX graphs of a ``PackedNet`` built node by node with standard ops only.

Building the graph directly (rather than tracing) keeps it exactly the ops we choose: a block-sparse
layer is Reshape -> Gather (over input *tiles*) -> Reshape -> Transpose -> MatMul -> Transpose ->
Reshape -> Add, whose initializers are only the live tiles, so file size and FLOPs shrink with
sparsity, and the batch axis stays dynamic. onnxruntime has no fast kernel for unstructured sparse
weights (sparse initializers are densified at load), so CSR layers are emitted as dense MatMuls.

onnx is imported when a graph is built: packing a ``model.pt`` for the torch or fused runtime never loads it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from g2gserve.formats import PackedNet, encoder

if TYPE_CHECKING:
    import onnx

DEFAULT_OPSET = 17
MIN_OPSET = 13


class _Graph:
    """The node/initializer builder that formats' ``onnx_nodes`` write into (``const``, ``shape``, ``op``)."""

    def __init__(self):
        from onnx import helper, numpy_helper
        self._helper, self._numpy_helper = helper, numpy_helper
        self.nodes, self.inits, self._n = [], [], 0

    def const(self, name: str, array) -> str:
        self.inits.append(self._numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def shape(self, name: str, dims: list[int]) -> str:
        return self.const(name, np.array(dims, dtype=np.int64))

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        self._n += 1
        out = f"{op_type.lower()}_{self._n}"
        self.nodes.append(self._helper.make_node(op_type, inputs, [out], name=f"{op_type}_{self._n}", **attrs))
        return out


def build_onnx(packed: PackedNet, opset: int = DEFAULT_OPSET, name: str = "g2gnet") -> "onnx.ModelProto":
    import onnx
    from onnx import TensorProto, helper
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old; use {MIN_OPSET} or newer")
    g = _Graph()
    features = packed.layers[0].in_features if packed.layers else packed.head_weight.shape[1]
    h = encoder.onnx_nodes(g, packed.conv_weight, packed.conv_bias, features, "input")
    for layer in packed.layers:
        h = g.op("Relu", [layer.spec.onnx_nodes(g, layer, h)])
    h = g.op("MatMul", [h, g.const("head.weight_t", packed.head_weight.T)])
    g.nodes.append(helper.make_node("Add", [h, g.const("head.bias", packed.head_bias)], ["logits"], name="Add_head"))
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
