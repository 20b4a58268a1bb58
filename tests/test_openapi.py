"""Issue 14 item 6: the OpenAPI document tells the truth, checked by schemathesis against the live server."""
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

pytest.importorskip("schemathesis", reason="schemathesis (test extra) is not installed")

from test_hardening import _serve  # noqa: E402
from test_server import _app, export_dir  # noqa: E402,F401 - export_dir is a fixture

CONFIG = Path(__file__).with_name("schemathesis.toml")


def test_error_models_and_metrics_are_declared(export_dir):  # noqa: F811
    server, thread, port = _serve(_app(export_dir, calibrate=False))
    try:
        spec = httpx.get(f"http://127.0.0.1:{port}/openapi.json").json()
        classify = spec["paths"]["/classify"]["post"]["responses"]
        for status in ("400", "413", "415", "422", "503"):
            assert classify[status]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
        assert list(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
        r = httpx.post(f"http://127.0.0.1:{port}/classify?top_k=zero", content=b"x")
        assert r.status_code == 422 and isinstance(r.json()["detail"], str) and r.json()["errors"][0]["loc"]
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_schemathesis_finds_nothing(export_dir, tmp_path):  # noqa: F811
    """All checks, a bounded number of examples, fixed seed; with an API key and the admin endpoint on."""
    app = _app(export_dir, calibrate=False, api_key="k3y", admin_token="t0ken")
    server, thread, port = _serve(app)
    try:
        run = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "--no-color", "--config-file", str(CONFIG), "run",
             f"http://127.0.0.1:{port}/openapi.json", "--checks", "all", "--max-examples", "25", "--seed", "14",
             "--workers", "1", "-H", "X-API-Key: k3y", "-H", "Authorization: Bearer t0ken"],
            capture_output=True, text=True, timeout=240, cwd=tmp_path, env={**os.environ, "SCHEMATHESIS_HOOKS": ""})
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "No issues found" in run.stdout
