"""g2g-serve MODEL: serve image classification over HTTP with uvicorn."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from g2gserve.model.checkpoint import CheckpointError, load_checkpoint
from g2gserve.bundle import ExportError, read_bundle
from g2gserve.runtime import BACKENDS

from . import hardening
from .app import ServeConfig, create_app


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="g2g-serve",
        description="Serve a G2GNet (export directory or model.pt) with FastAPI/uvicorn: POST /classify, "
                    "GET /healthz /readyz /model /stats /metrics, docs at /docs. Concurrent requests are "
                    "micro-batched; at start-up the server measures the sparse model against its dense twin "
                    "on this machine (GET /stats).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", type=Path, help="export directory (g2g-export) or model.pt (exported in memory)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backend", choices=BACKENDS, default="torch",
                   help="torch (CPU or CUDA), onnxruntime (model.onnx) or fused (compiled CPU kernel, "
                        "lowest latency at small batches)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--max-batch", type=int, default=32, help="images per forward pass at most")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits to fill up")
    p.add_argument("--max-queue", type=int, default=512, help="images waiting at most; beyond: 503 + Retry-After")
    p.add_argument("--max-body-mb", type=float, default=10.0, help="request body limit (413 beyond)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads per worker")
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (each loads the model)")
    p.add_argument("--no-calibrate", action="store_true", help="skip the start-up sparse-vs-dense measurement")
    hardening.add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    args = build_parser().parse_args(argv)
    try:  # refuse a missing, tampered or foreign model before starting uvicorn
        if args.model.is_dir():
            read_bundle(args.model)
        else:
            load_checkpoint(args.model)
    except (ExportError, CheckpointError) as e:
        print(f"g2g-serve: error: {e}", file=sys.stderr)
        return 2
    try:
        cfg = ServeConfig(model=str(args.model), backend=args.backend, device=args.device, max_batch=args.max_batch,
                          max_wait_ms=args.max_wait_ms, max_queue_images=args.max_queue,
                          max_body_bytes=int(args.max_body_mb * 2**20), threads=args.threads,
                          calibrate=not args.no_calibrate, **hardening.config_kwargs(args))
        bounds = hardening.uvicorn_options(args)
    except ValueError as e:
        print(f"g2g-serve: error: {e}", file=sys.stderr)
        return 2
    common = dict(host=args.host, port=args.port, timeout_graceful_shutdown=30, log_level="info", **bounds)
    if args.workers > 1:
        os.environ["G2G_SERVE_CONFIG"] = json.dumps(dataclasses.asdict(cfg))
        uvicorn.run("server.app:app_from_env", factory=True, workers=args.workers, **common)
    else:
        hardening.exit_zero_on_sigterm()
        uvicorn.run(create_app(cfg), **common)
    return 0


if __name__ == "__main__":
    sys.exit(main())
