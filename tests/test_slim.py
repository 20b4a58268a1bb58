"""Serving without torch (issue 18) and without onnx/training code: checked in fresh subprocesses.

These tests need no torch themselves except to make the export, so the same file runs in the slim
``[serve]``-only venv (``make test-slim``), where the export, images and the torch backend's answers come
from ``G2G_SLIM_EXPORT`` (made by ``tests/tiny_export.py`` in the full venv).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BLOCK_TORCH = "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError

PROBE = """
import json, sys
import numpy as np
from g2gserve.runtime import load
images = np.load(sys.argv[2])
out = {}
for backend in sys.argv[3].split(","):
    m = load(sys.argv[1], backend=backend)
    probs = m.predict(images)
    assert isinstance(probs, np.ndarray) and probs.dtype == np.float32, type(probs)
    out[backend] = probs.tolist()
heavy = ("torch", "onnx", "g2gserve.data.datasets", "training", "g2gserve.export")
out["imported"] = sorted(m for m in heavy if sys.modules.get(m) is not None)
print(json.dumps(out))
"""


def _run(code: str, *args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def export_and_images(tmp_path_factory):
    """An export of a small block-sparse model and real-ish images (the conftest's class-bar images)."""
    if os.environ.get("G2G_SLIM_EXPORT"):  # made by tests/tiny_export.py in the full venv
        export = Path(os.environ["G2G_SLIM_EXPORT"])
        return export, export.parent / "images.npy", np.load(export.parent / "expected.npy")
    d = tmp_path_factory.mktemp("slim")
    images = np.random.default_rng(0).integers(0, 256, (5, 1, 28, 28), dtype=np.uint8)
    np.save(d / "images.npy", images)
    pytest.importorskip("torch")
    from g2gserve.export import export_checkpoint
    from test_export import _checkpoint
    _, _, path = _checkpoint(d, granularity="block")
    export_checkpoint(path, d / "exp")
    from g2gserve.runtime import load
    return d / "exp", d / "images.npy", load(d / "exp", backend="torch").predict(images)


def test_onnxruntime_and_fused_serve_without_torch(export_and_images):
    export, images, expected = export_and_images
    out = _run(BLOCK_TORCH + PROBE, export, images, "onnxruntime,fused")
    assert out["imported"] == []  # no torch, no onnx, no training data code, no exporter
    for backend in ("onnxruntime", "fused"):  # the torch backend's answers
        assert np.allclose(out[backend], expected, atol=1e-5), backend
        assert (np.argmax(out[backend], 1) == expected.argmax(1)).all()


def test_torch_backend_imports_neither_onnx_nor_training_code(export_and_images):
    pytest.importorskip("torch")
    export, images, expected = export_and_images
    for source in (export, export.parent / "model.pt"):  # a model.pt is packed in memory, no ONNX graphs
        out = _run(PROBE, source, images, "torch")
        assert out["imported"] == (["torch"] if source == export else ["g2gserve.export", "torch"])
        assert np.allclose(out["torch"], expected, atol=1e-6)


def test_a_missing_backend_dependency_is_named(export_and_images):
    export, images, _ = export_and_images
    code = ("import sys; sys.modules['numba'] = None\nfrom g2gserve.runtime import load\n"
            "try:\n    load(sys.argv[1], backend='fused')\nexcept ImportError as e:\n"
            "    import json; print(json.dumps({'error': str(e)}))\n")
    assert "the fused backend needs numba" in _run(code, export)["error"]
    code = code.replace("'numba'", "'torch'").replace("'fused'", "'torch'")
    assert "the torch backend needs torch" in _run(code, export)["error"]


def test_import_g2gserve_is_light():
    out = _run(BLOCK_TORCH + "import sys, json, g2gserve, g2gserve.bundle, g2gserve.formats\n"
               "print(json.dumps({'version': g2gserve.__version__}))")
    assert out["version"]


SERVE = """
import io, json, sys
import numpy as np
from PIL import Image
from fastapi.testclient import TestClient
from server.app import ServeConfig, create_app
images = np.load(sys.argv[2])
pngs = []
for image in images:
    buf = io.BytesIO()
    Image.fromarray(image[0]).save(buf, "PNG")
    pngs.append(("file", (f"{len(pngs)}.png", buf.getvalue(), "image/png")))
out = {}
for backend in sys.argv[3].split(","):
    cfg = ServeConfig(model=sys.argv[1], backend=backend, calibrate=False)
    with TestClient(create_app(cfg)) as client:
        r = client.post("/classify?top_k=1000", files=pngs)
        assert r.status_code == 200, r.text
        rows = [{t["class_id"]: t["probability"] for t in p["top_k"]} for p in r.json()["predictions"]]
        out[backend] = [[row[c] for c in range(len(row))] for row in rows]
heavy = ("torch", "onnx", "g2gserve.data.datasets", "training", "g2gserve.export")
out["imported"] = sorted(m for m in heavy if sys.modules.get(m) is not None)
print(json.dumps(out))
"""


def test_the_server_classifies_without_torch_like_the_torch_backend(export_and_images):
    """Issue 18: g2g-serve with onnxruntime and fused where torch cannot be imported, real PNG uploads."""
    pytest.importorskip("fastapi")
    export, images, expected = export_and_images
    out = _run(BLOCK_TORCH + SERVE, export, images, "onnxruntime,fused")
    assert out["imported"] == []
    for backend in ("onnxruntime", "fused"):
        assert np.allclose(out[backend], expected, atol=1e-5), backend


def test_install_size_measures_each_distribution():
    from g2gserve.bench.install_size import distribution_sizes, report
    sizes = distribution_sizes(sys.executable)
    assert sizes["numpy"] > 2**20 and all(v >= 0 for v in sizes.values())
    venv = Path(sys.prefix)
    if (venv / "bin" / "python").exists():
        text = report([venv, venv], top=len(sizes))
        assert f"| numpy | {sizes['numpy'] / 2**20:,.1f} |" in text and "1.000x" in text


CALIBRATE = """
import importlib.machinery, json, sys
from fastapi.testclient import TestClient
from server.app import ServeConfig, create_app
cfg = ServeConfig(model=sys.argv[1], backend="onnxruntime", calibration_seconds=0.05, max_batch=4, calibrate=False,
                  admin_token="t0ken")
with TestClient(create_app(cfg)) as client:
    cal = client.post("/stats/calibrate", headers={"Authorization": "Bearer t0ken"}).json()
cal["torch_installed"] = importlib.machinery.PathFinder.find_spec("torch") is not None
cal["torch_imported"] = sys.modules.get("torch") is not None
print(json.dumps(cal))
"""


def test_a_torch_free_server_calibrates_and_reports_slim_memory(export_and_images):
    """/stats' calibration in a process without torch: the slim sparse/dense peaks always, the torch-based ones
    only where torch is installed (in .venv-slim it is not, and calibration must not fail for it)."""
    pytest.importorskip("fastapi")
    export, _, _ = export_and_images
    cal = _run(BLOCK_TORCH + CALIBRATE, export)
    assert cal["status"] == "done", cal
    assert not cal["torch_imported"] and cal["resident_memory_slim"]["backend"] == "onnxruntime"
    assert cal["resident_memory_slim"]["sparse_peak_bytes"] > 0
    assert ("resident_memory" in cal) == cal["torch_installed"]
