"""Issue 14 items 3 and 7 through the real ``g2g-serve`` process: TLS, API key, CORS, offline /docs, SIGTERM."""
import datetime
import os
import signal
import ssl
import subprocess
import sys
import time

import httpx
import pytest
import torch

pytest.importorskip("fastapi", reason="the server extra is not installed")

from g2gserve.model.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from test_server import _free_port, _png, export_dir  # noqa: E402,F401 - export_dir is a fixture


def _self_signed(tmp_path):
    """A throwaway certificate for 127.0.0.1, made with the openssl CLI."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


def test_tls_api_key_cors_offline_docs_and_sigterm_exit_0(export_dir, tmp_path):  # noqa: F811
    cert, key = _self_signed(tmp_path)
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", str(export_dir), "--port", str(port), "--no-calibrate", "--threads", "1",
         "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--api-key", "k3y",
         "--cors-origin", "https://app.example"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=os.environ)
    url = f"https://127.0.0.1:{port}"
    try:
        with httpx.Client(verify=ssl.create_default_context(cafile=str(cert)), timeout=10) as c:
            for _ in range(300):
                try:
                    if c.get(f"{url}/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            assert c.post(f"{url}/classify", content=_png()).status_code == 401
            assert c.post(f"{url}/classify", content=_png(), headers={"X-API-Key": "wrong"}).status_code == 401
            assert c.post(f"{url}/classify", content=_png(), headers={"X-API-Key": "k3y"}).status_code == 200
            preflight = c.options(f"{url}/classify", headers={"Origin": "https://app.example",
                                                              "Access-Control-Request-Method": "POST"})
            assert preflight.headers["access-control-allow-origin"] == "https://app.example"
            other = c.get(f"{url}/healthz", headers={"Origin": "https://evil.example"})
            assert "access-control-allow-origin" not in other.headers
            docs = c.get(f"{url}/docs").text
            assert "http://" not in docs and "https://" not in docs  # nothing from a CDN
            for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
                assert f"/docs/assets/{asset}" in docs and c.get(f"{url}/docs/assets/{asset}").status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_refuses_half_a_tls_setup_and_unbounded_bounds(export_dir, tmp_path, capsys):  # noqa: F811
    from server.cli import main
    assert main([str(export_dir), "--ssl-certfile", str(tmp_path / "cert.pem")]) == 2
    assert "go together" in capsys.readouterr().err
    assert main([str(export_dir), "--body-timeout", "0"]) == 2
    assert "--body-timeout must be positive" in capsys.readouterr().err


def test_pickled_objects_are_refused_with_the_whole_reason(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"format": "g2gserve", "when": datetime.datetime(2020, 1, 1)}, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    message = str(e.value)
    assert "datetime.datetime" in message and "would run code" in message and message.endswith("never does")
    assert "weights_only=False" not in message and "weights_only` set to `False" not in message
