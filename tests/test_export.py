import json

import numpy as np
import pytest
import torch

from export.cli import main as export_main
from g2gserve.model.checkpoint import from_model, save_checkpoint
from g2gserve.model.config import MODEL_KINDS
from g2gserve.bundle import ExportError, read_bundle, sha256
from g2gserve.export import check_parity, build_artifacts, export_checkpoint
from g2gserve.formats import densify, format_of, pack_model
from g2gserve.model.g2gnet import build_model
from g2gserve.data.preprocess import Preprocess
from g2gserve.runtime import load
from g2gserve.runtime.torch_backend import PackedModule

from conftest import tiny_config

CLASSES = [f"c{i}" for i in range(10)]


def _trained_like(cfg):
    """A model with non-trivial biases/weights (fresh init has zero-mean biases that hide bugs)."""
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for layer in model.hidden:
            layer.bias.normal_(0, 0.5)
            layer.weight.normal_(0, 0.2)
            layer.apply_mask_()
    return model


def _checkpoint(tmp_path, **kw):
    cfg = tiny_config(**kw)
    model = _trained_like(cfg)
    ckpt = from_model(model, CLASSES, Preprocess(1, 28, 28, (0.3,), (0.35,)), [{"epoch": 1, "test_acc": 0.5}])
    path = tmp_path / "model.pt"
    save_checkpoint(path, ckpt)
    return model, ckpt, path


CASES = [dict(kind=k, granularity=g) for k in MODEL_KINDS for g in ("edge", "block")] + [
    dict(grouping="random", granularity="block"), dict(grouping="index", granularity="block")]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
def test_every_format_and_graph_matches_pytorch(kw):
    model = _trained_like(tiny_config(**kw))
    from g2gserve.model.checkpoint import from_model as fm
    ckpt = fm(model, CLASSES, Preprocess(1, 28, 28, (0.3,), (0.35,)))
    formats = ["auto", "dense"] + (["csr"] if model.cfg.is_sparse else []) + \
        (["block"] if model.cfg.is_sparse and model.cfg.granularity == "block" else [])
    x = torch.randn(64, 1, 28, 28)
    for fmt in formats:
        art = build_artifacts(model, ckpt, fmt)
        errors = check_parity(model, art, x)
        worst = max(e for per in errors.values() for e in per.values())
        assert worst < 1e-5, (fmt, errors)
        assert set(errors["model.onnx"]) == {"1", "7", "64"}


def test_block_granularity_exports_block_and_shrinks(tmp_path):
    _, _, path = _checkpoint(tmp_path, granularity="block")
    manifest = export_checkpoint(path, tmp_path / "exp")
    assert [l["format"] for l in manifest["layers"]] == ["block", "block"]
    assert manifest["sizes"]["weight_ratio"] < 0.35 and manifest["sizes"]["onnx_ratio"] < 0.4
    assert manifest["parity"]["worst"] <= 1e-4
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == ["dense.onnx", "manifest.json", "model.onnx",
                                                                   "weights.safetensors"]


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "fused"])
@pytest.mark.parametrize("variant", ["sparse", "dense"])
def test_round_trip_through_files_and_checkpoint(tmp_path, backend, variant):
    model, ckpt, path = _checkpoint(tmp_path, granularity="block")
    export_checkpoint(path, tmp_path / "exp")
    images = torch.randint(0, 256, (7, 1, 28, 28), dtype=torch.uint8)
    expected = torch.softmax(model(ckpt.preprocess(images)), 1)
    for source in (tmp_path / "exp", path):
        m = load(source, backend=backend, variant=variant)
        probs = m.predict(images)
        assert isinstance(probs, np.ndarray) and probs.dtype == np.float32
        assert probs.shape == (7, 10) and np.allclose(probs, expected.detach().numpy(), atol=1e-5)
        assert m.classes == CLASSES and m.input_shape == (1, 28, 28)
        assert m.predict(images[:0]).shape == (0, 10)  # an empty batch is an empty answer on every backend


def test_block_packer_on_hand_made_masks():
    b = 2
    mask = torch.zeros(6, 8, dtype=torch.bool)
    mask[0:2, 0:2] = True          # tile-row 0: a single tile
    mask[2:4, :] = True            # tile-row 1: full row
    # tile-row 2 (rows 4-5): empty
    w = torch.randn(6, 8)
    bias = torch.randn(6)
    block = format_of("block")
    layer = block.pack("l", w.numpy(), mask.numpy(), bias.numpy(), b)
    assert layer.tensors["idx"].shape == (3, 4)  # K = widest row
    assert layer.tensors["idx"].tolist() == [[0, 0, 0, 0], [0, 1, 2, 3], [0, 0, 0, 0]]  # live first, then padding
    assert np.array_equal(layer.dense_weight(), (w * mask).numpy())
    block.validate(layer)
    x = torch.randn(5, 8)
    assert torch.allclose(block.torch_module(layer)(x), x @ (w * mask).t() + bias, atol=1e-6)
    with pytest.raises(ValueError, match="not made of whole 2x2 tiles"):
        bad = mask.clone()
        bad[0, 0] = False
        block.pack("l", w.numpy(), bad.numpy(), bias.numpy(), b)


def test_csr_packer_on_hand_made_masks():
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[1] = True                 # full row
    mask[3, 2] = True              # single entry; rows 0 and 2 empty
    w = torch.randn(4, 5)
    bias = torch.randn(4)
    csr = format_of("csr")
    layer = csr.pack("l", w.numpy(), mask.numpy(), bias.numpy(), 0)
    assert layer.tensors["crow"].tolist() == [0, 0, 5, 5, 6]
    assert layer.tensors["col"].dtype == np.int32 and layer.tensors["values"].size == 6
    csr.validate(layer)
    x = torch.randn(3, 5)
    assert torch.allclose(csr.torch_module(layer)(x), x @ (w * mask).t() + bias, atol=1e-6)
    assert np.array_equal(layer.dense_weight(), (w * mask).numpy())


def test_random_grouping_is_folded_into_the_layout():
    model = _trained_like(tiny_config(grouping="random", granularity="block"))
    packed = pack_model(model)
    x = torch.randn(4, 1, 28, 28)
    assert torch.allclose(PackedModule(packed)(x), model(x), atol=1e-5)
    assert torch.allclose(PackedModule(densify(packed))(x), model(x), atol=1e-5)


def _tamper(tmp_path, edit):
    _, _, path = _checkpoint(tmp_path, granularity="block")
    d = tmp_path / "exp"
    export_checkpoint(path, d)
    edit(d)
    return d


def _rewrite_manifest(d, change):
    m = json.loads((d / "manifest.json").read_text())
    change(m)
    (d / "manifest.json").write_text(json.dumps(m))


def _rewrite_weights(d, change):
    from safetensors.numpy import load_file, save_file
    t = load_file(str(d / "weights.safetensors"))
    change(t)
    save_file(t, str(d / "weights.safetensors"))
    digest = sha256(d / "weights.safetensors")  # a careful tamperer fixes the checksum
    _rewrite_manifest(d, lambda m: m["files"]["weights.safetensors"].update(sha256=digest))


@pytest.mark.parametrize("edit,message", [
    (lambda d: (d / "model.onnx").unlink(), "missing model.onnx"),
    (lambda d: (d / "manifest.json").write_text("{not json"), "not valid JSON"),
    (lambda d: _rewrite_manifest(d, lambda m: m.update(format_version=99)), "version 99 is not supported"),
    (lambda d: (d / "dense.onnx").write_bytes(b"junk"), "dense.onnx does not match the checksum"),
    (lambda d: _rewrite_weights(d, lambda t: t.update({"hidden.0.idx": t["hidden.0.idx"] + 1000})), "outside"),
    (lambda d: _rewrite_weights(d, lambda t: t.update({"hidden.1.blocks": np.ascontiguousarray(t["hidden.1.blocks"][:, :8])})), "shape"),
    (lambda d: _rewrite_weights(d, lambda t: t.pop("head.bias")), "head.bias"),
    (lambda d: _rewrite_manifest(d, lambda m: m["classes"].pop()), "9 class names"),
])
def test_tampered_exports_are_rejected(tmp_path, edit, message):
    d = _tamper(tmp_path, edit)
    with pytest.raises(ExportError, match=message):
        read_bundle(d)
    with pytest.raises(ExportError):
        load(d)


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("edit,message", [
    (lambda d: _rewrite_manifest(d, lambda m: m.pop("files")), "no 'files' section"),
    (lambda d: _rewrite_manifest(d, lambda m: m.update(files={})), "no checksum for weights.safetensors, model.onnx"),
    (lambda d: _rewrite_manifest(d, lambda m: m.update(files=[])), "must map file names"),
    (lambda d: _rewrite_manifest(d, lambda m: m["files"].pop("model.onnx")), "no checksum for model.onnx"),
    (lambda d: _flip_byte(d / "weights.safetensors"), "weights.safetensors does not match the checksum"),
    (lambda d: _flip_byte(d / "model.onnx"), "model.onnx does not match the checksum"),
    (lambda d: _rewrite_manifest(d, lambda m: m["files"].update({"../../etc/passwd": {"sha256": "0"}})),
     r"names '../../etc/passwd': only plain file names inside the export directory"),
    (lambda d: _rewrite_manifest(d, lambda m: m["files"].update({"/etc/passwd": {"sha256": "0"}})), "only plain file names"),
    (lambda d: _rewrite_manifest(d, lambda m: m["files"].update({"sub/model.onnx": {"sha256": "0"}})), "only plain file names"),
    (lambda d: _rewrite_manifest(d, lambda m: m["files"].update({"..": {"sha256": "0"}})), "only plain file names"),
    (lambda d: _rewrite_manifest(d, lambda m: m["files"].update({"notes.txt": {"sha256": "0"}})), "not a file of an export"),
    (lambda d: _rewrite_manifest(d, lambda m: m["files"]["dense.onnx"].pop("sha256")), "dense.onnx does not match"),
    (lambda d: _rewrite_manifest(d, lambda m: m.update(format_version=1)), "version 1 is not supported .* re-export"),
    (lambda d: _rewrite_manifest(d, lambda m: m["layers"][0].update(density="high")), r"manifest.layers\[0\].density must be float"),
    (lambda d: _rewrite_manifest(d, lambda m: m.pop("unit_orders")), "lacks 'unit_orders'"),
])
def test_export_checksums_cannot_be_skipped(tmp_path, edit, message):
    """Issue 14: every artifact's sha256 is mandatory and names stay inside the directory."""
    d = _tamper(tmp_path, edit)
    with pytest.raises(ExportError, match=message):
        read_bundle(d)


def test_manifest_round_trips_through_its_schema(tmp_path):
    from g2gserve.bundle import Manifest, json_schema
    d = _tamper(tmp_path, lambda d: None)
    raw = json.loads((d / "manifest.json").read_text())
    assert Manifest.from_dict(raw).to_dict() == raw
    schema = json_schema()["$defs"]["Manifest"]
    assert set(schema["required"]) <= set(raw) and set(raw) <= set(schema["properties"])
    assert read_bundle(d).packed.unit_orders[1].shape == (64,)
    from g2gserve.bundle import main as bundle_main
    assert bundle_main(["--check", str(d)]) == 0
    _flip_byte(d / "dense.onnx")
    assert bundle_main(["--check", str(d)]) == 1


def test_disagreeing_artifacts_refuse_to_write(tmp_path, monkeypatch):
    _, _, path = _checkpoint(tmp_path, granularity="block")
    import g2gserve.export.writer as ex
    real = ex.check_parity
    monkeypatch.setattr(ex, "check_parity", lambda *a: {k: {kk: vv + 1.0 for kk, vv in v.items()}
                                                        for k, v in real(*a).items()})
    with pytest.raises(ExportError, match="disagree"):
        export_checkpoint(path, tmp_path / "exp")
    assert not (tmp_path / "exp").exists() and [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_cli_on_a_tiny_checkpoint(tmp_path, capsys):
    _, _, path = _checkpoint(tmp_path, granularity="edge", sparsity=0.5)  # p' > 0: not tile-structured
    assert export_main([str(path), "--format", "csr"]) == 0
    out = capsys.readouterr().out
    assert "csr" in out and "parity" in out and (tmp_path / "export" / "model.onnx").exists()
    with pytest.raises(SystemExit):
        export_main([str(path)])
    assert "already exists" in capsys.readouterr().err
    assert export_main([str(path), "--force", "--format", "block"]) == 1
    assert "not made of whole" in capsys.readouterr().err
    assert export_main([str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x")]) == 1
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    assert export_main([str(tmp_path / "bad.pt"), "--out", str(tmp_path / "y")]) == 1
    assert not (tmp_path / "y").exists()
    with pytest.raises(SystemExit):
        export_main([str(path), "--opset", "7", "--force"])


def test_the_documented_schema_is_current():
    """docs/manifest.schema.json is generated: python -m g2gserve.bundle --schema docs/manifest.schema.json"""
    from pathlib import Path
    from g2gserve.bundle import json_schema
    doc = Path(__file__).resolve().parents[1] / "docs" / "manifest.schema.json"
    assert json.loads(doc.read_text()) == json_schema()


def test_export_calibrates_int8_scales_on_real_training_images_only(tmp_path, idx_dir, capsys):
    """Static int8 activation scales come from real training images (never the test set, never synthetic ones), from
    a numpy forward that matches PyTorch; they are validated on read and served by the fused backend's int8-static."""
    from g2gserve.export.calibration import activation_scales, calibration_images, layer_outputs
    from g2gserve.runtime.fused import host_isa, supported
    model, ckpt, path = _checkpoint(tmp_path, granularity="block", block_size=16, conv_channels=32)
    ckpt.meta["dataset"] = "fashion-mnist"
    save_checkpoint(path, ckpt)
    assert export_main([str(path), "--out", str(tmp_path / "exp"), "--data-dir", str(idx_dir)]) == 0
    assert "int8 scales calibrated on fashion-mnist train set (256 images, seed 0)" in capsys.readouterr().out
    bundle = read_bundle(tmp_path / "exp")
    c = bundle.manifest.calibration
    assert c.images == 256 and c.quantile == 99.99 and len(c.activation_scales) == 3
    images, source = calibration_images("fashion-mnist", (1, 28, 28), idx_dir)
    x = ckpt.preprocess(images)
    outputs = layer_outputs(bundle.packed, x)
    with torch.no_grad():
        assert np.abs(outputs[-1] - model(torch.from_numpy(x)).numpy()).max() < 1e-4
    assert c.activation_scales == pytest.approx(activation_scales(bundle.packed, x))
    assert c.activation_scales == pytest.approx([np.percentile(o, 99.99) / 255 for o in outputs[:-1]])
    if supported(host_isa(), "int8"):
        fp32 = load(tmp_path / "exp", backend="fused").predict(images)
        for variant in ("sparse", "dense"):
            int8 = load(tmp_path / "exp", backend="fused", dtype="int8-static", variant=variant).predict(images)
            assert np.abs(int8 - fp32).max() < 0.05 and (int8.argmax(1) == fp32.argmax(1)).mean() >= 0.99
    # no data set named (or none found): nothing calibrated, and int8-static says why
    (tmp_path / "bare").mkdir()
    _, _, bare = _checkpoint(tmp_path / "bare", granularity="block", block_size=16, conv_channels=32)
    assert export_checkpoint(bare, tmp_path / "bare-exp", data_dir=idx_dir)["calibration"] is None
    with pytest.raises(ValueError, match="no int8 calibration .* use dtype int8"):
        load(tmp_path / "bare-exp", backend="fused", dtype="int8-static")
    _rewrite_manifest(tmp_path / "exp", lambda m: m["calibration"].update(activation_scales=[0.1, -1.0, 0.1]))
    with pytest.raises(ExportError, match="calibration.activation_scales must be 3 positive numbers"):
        read_bundle(tmp_path / "exp")
