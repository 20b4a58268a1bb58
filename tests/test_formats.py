"""Every registered packed format agrees with itself across runtimes, and the patch encoder's forms agree."""
import numpy as np
import pytest
import torch

from g2gserve.formats import REGISTRY, encoder, format_of, pack_model
from g2gserve.model.g2gnet import build_model

from conftest import tiny_config


def _layer(fmt: str, rng):
    """A 32x48 layer with whole 8x8 tiles live (so every format can store it) and a non-trivial bias."""
    live = rng.random((4, 6)) < 0.4
    live[:, 0] = True
    mask = np.kron(live, np.ones((8, 8), bool))
    w = rng.standard_normal((32, 48)).astype(np.float32)
    if fmt == "dense":
        mask = None
    bias = rng.standard_normal(32).astype(np.float32)
    return format_of(fmt).pack("l", w, mask, bias, 8), (w if mask is None else w * mask)


@pytest.mark.parametrize("fmt", sorted(REGISTRY))
def test_each_format_is_one_function_in_every_runtime(fmt):
    from onnx import TensorProto, helper

    import onnxruntime as ort
    from g2gserve.export.onnx_graph import _Graph
    rng = np.random.default_rng(0)
    layer, weight = _layer(fmt, rng)
    spec = format_of(fmt)
    spec.validate(layer)
    assert set(layer.tensors) == set(spec.tensor_names)
    assert np.array_equal(layer.dense_weight(), weight)
    x = rng.standard_normal((5, 48)).astype(np.float32)
    expected = x @ weight.T + layer.tensors["bias"]
    got_torch = spec.torch_module(layer)(torch.from_numpy(x)).numpy()
    g = _Graph()
    out = spec.onnx_nodes(g, layer, "x")
    graph = helper.make_graph(g.nodes, "l", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 48])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["n", 32])], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    got_onnx = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    blocks, idx, t_in, t_out = spec.fused_tiles(layer)  # y[:, o*t_out + j] = sum_k x[:, idx[o,k]*t_in + i] blocks[o, k*t_in + i, j]
    got_tiles = np.concatenate([np.concatenate([x[:, i * t_in:(i + 1) * t_in] for i in row], 1) @ blocks[o]
                                for o, row in enumerate(idx)], 1)[:, :32] + layer.tensors["bias"]
    for got in (got_torch, got_onnx, got_tiles):
        assert np.allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("fmt", sorted(REGISTRY))
def test_validation_names_the_broken_tensor(fmt):
    layer, _ = _layer(fmt, np.random.default_rng(1))
    name = next(k for k in format_of(fmt).tensor_names if k != "bias")
    layer.tensors[name] = layer.tensors[name][:-1]
    with pytest.raises(ValueError, match=f"l.{name}"):
        format_of(fmt).validate(layer)
    layer, _ = _layer(fmt, np.random.default_rng(1))
    del layer.tensors["bias"]
    with pytest.raises(ValueError, match="missing tensor l.bias"):
        format_of(fmt).validate(layer)


def test_patch_encoder_forms_agree_with_the_training_conv():
    from g2gserve.runtime.fused import ISAS
    from g2gserve.runtime.fused.layout import encoder_panels
    from g2gserve.runtime.torch_backend import PackedModule
    torch.manual_seed(0)
    model = build_model(tiny_config(in_channels=3, image_size=32)).eval()
    packed = pack_model(model)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = model.encoder(x).numpy()
        got_torch = PackedModule(packed).encode(x).numpy()
    got_numpy = encoder.encode(x.numpy(), packed.conv_weight, packed.conv_bias)
    assert np.allclose(got_torch, ref, atol=1e-5) and np.allclose(got_numpy, ref, atol=1e-5)
    p = packed.patch_size
    _, idx, t_in, _, _, _ = encoder_panels(packed, ISAS["generic"], "fp32")  # live input tiles of p pixels per patch
    flat = x.numpy().reshape(3, -1)
    rows = np.stack([np.concatenate([image[i * t_in:(i + 1) * t_in] for i in tiles]) for image in flat for tiles in idx])
    assert np.array_equal(rows, encoder.patchify(x.numpy(), p))  # the fused encoder reads patchify's patches
