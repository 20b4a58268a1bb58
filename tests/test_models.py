import pytest
import torch

from g2gserve.model.accounting import model_summary
from g2gserve.model.config import MODEL_KINDS, ModelConfig
from g2gserve.model.g2gnet import build_model, matched_width

from conftest import tiny_config


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("channels,size,classes", [(1, 28, 10), (3, 32, 100)])
def test_shapes_for_both_input_kinds(kind, channels, size, classes):
    cfg = tiny_config(kind=kind, in_channels=channels, image_size=size, num_classes=classes)
    model = build_model(cfg)
    assert model(torch.randn(5, channels, size, size)).shape == (5, classes)


def test_default_g2g_matches_the_paper_shape():
    model = build_model(ModelConfig())
    s = model_summary(model)
    assert [tuple(l.weight.shape) for l in model.hidden] == [(1024, 512), (1024, 1024), (1024, 1024)]
    assert [round(l["density"], 6) for l in s["layers"][1:4]] == [0.25, 0.25, 0.25]
    assert s["macs_sparse"] < s["macs_dense"] / 3.8


def test_dense_params_matches_active_parameter_count():
    cfg = ModelConfig(kind="dense-params")
    g2g = model_summary(build_model(ModelConfig()))
    dp = model_summary(build_model(cfg))
    assert dp["params"] == dp["active_params"]
    assert abs(dp["params"] - g2g["active_params"]) / g2g["active_params"] < 0.01
    assert build_model(cfg).cfg == cfg  # the saved config rebuilds the same model
    assert matched_width(cfg) < 1024


def test_er_has_same_density_as_g2g():
    a = model_summary(build_model(tiny_config(kind="g2g")))
    b = model_summary(build_model(tiny_config(kind="er")))
    assert a["active_params"] == b["active_params"]


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-1),
    lambda p: torch.optim.SGD(p, lr=1e-1, momentum=0.9, weight_decay=1e-2),
])
def test_masked_weights_stay_exactly_zero(make_opt):
    torch.manual_seed(0)
    model = build_model(tiny_config())
    before = [l.weight.detach().clone() for l in model.hidden]
    opt = make_opt(model.parameters())
    for _ in range(20):
        loss = torch.nn.functional.cross_entropy(model(torch.randn(16, 1, 28, 28)), torch.randint(0, 10, (16,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for layer, w0 in zip(model.hidden, before):
        assert torch.count_nonzero(layer.weight[~layer.mask]) == 0
        assert not torch.equal(layer.weight[layer.mask], w0[layer.mask])  # the live ones did train


def test_init_scaled_by_active_fan_in():
    torch.manual_seed(0)
    sparse = build_model(ModelConfig()).hidden[1]
    dense = build_model(ModelConfig(kind="dense")).hidden[1]
    # He init: per-unit variance of the pre-activation is about 2 * var(x) for sparse and dense alike
    x = torch.randn(4096, 1024)
    with torch.no_grad():
        ratio = (sparse(x) - sparse.bias).var() / (dense(x) - dense.bias).var()
    assert 0.9 < float(ratio) < 1.1


@pytest.mark.parametrize("kw,msg", [
    (dict(groups=3), "groups do not divide"),
    (dict(sparsity=1.0), r"sparsity must be in \[0, 1\)"),
    (dict(sparsity=-0.1), r"sparsity must be in \[0, 1\)"),
    (dict(sparsity=0.9), "impossible with 4 groups"),
    (dict(granularity="block", block_size=5), "block size 5 does not divide"),
    (dict(kind="mlp"), "unknown model"),
    (dict(grouping="zigzag"), "unknown grouping"),
    (dict(image_size=30), "not divisible"),
])
def test_impossible_configs_have_one_line_reasons(kw, msg):
    with pytest.raises(ValueError, match=msg) as e:
        tiny_config(**kw)
    assert "\n" not in str(e.value)


def test_loading_weights_reapplies_the_mask():
    model = build_model(tiny_config())
    state = {k: (torch.ones_like(v) if k.endswith("weight") else v) for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    for layer in model.hidden:
        assert torch.count_nonzero(layer.weight[~layer.mask]) == 0
