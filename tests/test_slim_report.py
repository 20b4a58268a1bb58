"""Issue 18's measurements: the wide model, /stats' slim figures and install size, the slim report page."""
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from g2gserve.bench import install_size  # noqa: E402
from test_export import _checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    from g2gserve.export import export_checkpoint
    d = tmp_path_factory.mktemp("slimreport")
    _, _, path = _checkpoint(d, granularity="block")
    export_checkpoint(path, d / "export")
    return d / "export"


@pytest.fixture
def install_json(tmp_path, monkeypatch):
    """A measured install summary (this interpreter's environment twice), where /stats and the report look."""
    venv = Path(sys.prefix)
    if not (venv / "bin" / "python").exists():
        pytest.skip("not a virtual environment")
    path = tmp_path / "install-size.json"
    assert install_size.main([str(venv), str(venv), "--names", "serve,full", "--json", str(path),
                              "--out", str(tmp_path / "install-size.md")]) == 0
    monkeypatch.setattr(install_size, "DEFAULT_JSON", path)
    return path


def test_install_size_json_round_trips(install_json, tmp_path):
    data = install_size.load_summary()
    assert [i["name"] for i in data["installs"]] == ["serve", "full"] and data["reference"] == "full"
    assert data["ratios"]["serve"] == pytest.approx(1.0) and data["installs"][0]["total_bytes"] > 2**20
    (tmp_path / "bad.json").write_text("{not json")
    assert install_size.load_summary(tmp_path / "bad.json") is None
    assert install_size.load_summary(tmp_path / "missing.json") is None


def test_wide_model_is_exported_through_the_parity_gate(tmp_path):
    from g2gserve.bench.wide import build_wide
    from g2gserve.runtime import load
    export = build_wide(tmp_path / "wide", hidden=512, layers=2)
    m = json.loads((export / "manifest.json").read_text())
    assert m["config"]["hidden"] == [512, 512] and m["config"]["block_size"] == 64
    assert m["parity"]["worst"] <= m["parity"]["tolerance"]
    assert m["sizes"]["stored_weight_bytes"] < 0.5 * m["sizes"]["dense_weight_bytes"]
    import numpy as np
    probs = load(export, backend="onnxruntime").predict(np.zeros((2, 1, 28, 28), np.uint8))
    assert probs.shape == (2, 10) and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_stats_reports_slim_memory_and_install_size(export_dir, install_json):
    from fastapi.testclient import TestClient
    from server.app import ServeConfig, create_app
    cfg = ServeConfig(model=str(export_dir), backend="onnxruntime", calibration_seconds=0.05, max_batch=8,
                      calibrate=False, admin_token="t0ken")
    with TestClient(create_app(cfg)) as client:
        cal = client.post("/stats/calibrate", headers={"Authorization": "Bearer t0ken"}).json()
        assert client.get("/stats").json()["calibration"] == cal  # what /stats reports
    assert cal["status"] == "done", cal
    slim, full = cal["resident_memory_slim"], cal["resident_memory"]
    assert slim["backend"] == "onnxruntime" and 0 < slim["sparse_peak_bytes"] < full["sparse_peak_bytes"]
    assert slim["ratio"] == pytest.approx(slim["sparse_peak_bytes"] / slim["dense_peak_bytes"])
    assert set(cal["install_size"]["bytes"]) == {"serve", "full"} and "ratio_to_full" in cal["install_size"]
    assert "without torch" in cal["summary"]


def test_slim_report_serves_without_torch_and_judges_every_target(export_dir, install_json, tmp_path):
    from g2gserve.bench import slim_report
    out = tmp_path / "docs"
    assert slim_report.main([str(export_dir), "--wide", str(export_dir), "--requests", "40", "--backends",
                             "onnxruntime", "--batch", "8", "--install-size", str(install_json),
                             "--out", str(out)]) == 0
    result = json.loads((out / "slim.json").read_text())
    served = result["serve"][0]
    assert served["requests"] == 40 and served["errors"] == 0 and served["vmhwm_bytes"] >= served["ready_rss_bytes"]
    assert len(served["rss_trace"]) == 40 and served["flat_spread"] is not None
    slim_rows = [r for r in result["probes"] if r["slim"]]
    assert slim_rows and not any(r["torch_imported"] for r in slim_rows)
    assert all(r["torch_imported"] for r in result["probes"] if not r["slim"])
    assert all(t["met"] in (True, False) for t in result["targets"])  # install size read, so all judged
    page = (out / "slim.md").read_text()
    assert result["machine"]["cpu"] in page and result["machine"]["isa"] in page
    assert page.count("| **met** |") + page.count("| **missed** |") == len(result["targets"]) == 5
    assert (out / "slim.png").stat().st_size > 0


def test_bench_page_names_the_install_sizes(install_json):
    from g2gserve.bench.measure import machine_info
    from server.bench import markdown
    page = markdown({"machine": machine_info(), "device": "cpu", "threads": 1, "command": "g2g-bench x",
                     "install_size": install_size.load_summary()})
    assert "`[serve]`" in page and "`[serve]` is 1.000x `[full]`" in page
