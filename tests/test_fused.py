"""The fused (numba) CPU kernel computes exactly the packed network, for every layer format and shape."""
import numpy as np
import pytest
import torch

from g2gserve.formats import densify, pack_model
from g2gserve.model.g2gnet import build_model
from g2gserve.runtime import load
from g2gserve.runtime.fused import META, FusedNet

from conftest import tiny_config


def _model(**kw):
    torch.manual_seed(0)
    model = build_model(tiny_config(**kw)).eval()
    with torch.no_grad():  # non-zero biases, so a bias bug cannot hide
        for layer in model.hidden:
            layer.bias.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("kw,fmt", [
    (dict(granularity="block"), "auto"),           # block tiles of 8
    (dict(granularity="block", block_size=16), "auto"),
    (dict(granularity="block", hidden=(64,)), "auto"),  # a single hidden layer
    (dict(granularity="edge"), "csr"),             # CSR layers run densified
    (dict(kind="dense"), "auto"),
    (dict(kind="dense-params"), "auto"),           # 23 units: tiles of 1, odd output counts
    (dict(in_channels=3, image_size=32, granularity="block"), "auto"),
])
def test_matches_pytorch_at_every_batch_size(kw, fmt):
    model = _model(**kw)
    packed = pack_model(model, fmt)
    for net in (FusedNet(packed), FusedNet(densify(packed))):
        for batch in (1, 2, 3, 4, 7, 64):  # chunks of 1, 2, 3, 4, 4+3, 9x6+2x5 rows: every micro-kernel
            x = torch.randn(batch, *packed.input_shape)
            with torch.no_grad():
                err = (torch.from_numpy(net(x.numpy())) - model(x)).abs().max().item()
            assert err < 1e-4, (kw, fmt, batch, err)


def test_dense_layers_are_panels_over_one_input_tile_spanning_all_inputs():
    packed = pack_model(_model(granularity="block"), "auto")
    sparse, dense = FusedNet(packed), FusedNet(densify(packed))
    col = {name: i for i, name in enumerate(META)}
    # rows: encoder, hidden layers, head; only the hidden layers differ, and only in their live input tiles
    assert len(dense.meta) == len(sparse.meta) == len(packed.layers) + 2
    for layer, d, s in zip(packed.layers, dense.meta[1:-1], sparse.meta[1:-1]):
        assert d[col["k"]] == 1 and d[col["t_in"]] == layer.in_features
        assert (dense.tiles[d[col["tiles_offset"]]:][:d[col["n_tiles"]]] == 0).all()
        assert s[col["k"]] * s[col["t_in"]] == pytest.approx(layer.in_features * layer.density)  # only live tiles
    for net in (sparse, dense):
        assert net.weights.ctypes.data % 64 == 0 and (net.meta[:, :2] % 16 == 0).all()  # cache-line aligned


def test_bad_input_is_refused():
    net = FusedNet(pack_model(_model(granularity="block"), "auto"))
    with pytest.raises(ValueError, match=r"expected input \(N, 1, 28, 28\)"):
        net(np.zeros((2, 3, 28, 28), np.float32))


def test_runs_on_cpu_only(tmp_path):
    for backend in ("fused", "onnxruntime"):
        with pytest.raises(ValueError, match=f"the {backend} backend runs on the CPU"):
            load(tmp_path, backend=backend, device="cuda")
