"""g2g-serve MODEL | --model-repository DIR: serve image classification over HTTP with uvicorn (uvloop + httptools
when installed): /classify and the Open Inference Protocol v2."""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
from pathlib import Path

from g2gserve.runtime import BACKENDS
from g2gserve.runtime.precision import ALL_DTYPES

from . import hardening
from .app import create_app
from .metrics import MULTIPROC_ENV
from .settings import CONFIG_ENV, ServeConfig


def build_parser() -> argparse.ArgumentParser:
    d = ServeConfig(model="MODEL")  # the defaults shown in --help
    p = argparse.ArgumentParser(
        prog="g2g-serve",
        description="Serve a G2GNet (export directory or model.pt) or a model repository with FastAPI/uvicorn: "
                    "POST /classify, the Open Inference Protocol v2 (/v2/...), a page at /, GET /healthz /readyz "
                    "/model /stats /metrics, docs at /docs. A forward pass starts as soon as "
                    "the model is free and takes every request waiting (adaptive micro-batching); decoding runs in "
                    "a thread pool; at start-up the server measures the sparse model against its dense twin on "
                    "this machine (GET /stats).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", type=Path, nargs="?",
                   help="export directory (g2g-export) or model.pt (exported in memory); or --model-repository")
    p.add_argument("--model-repository", type=Path, default=None, metavar="DIR",
                   help="serve DIR/<name>/<version>/ export directories (the highest version of each name) over "
                        "the Open Inference Protocol v2; /classify uses --default-model")
    p.add_argument("--default-model", default=None, metavar="NAME",
                   help="the repository model /classify, /model and /stats use (default: the first by name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backend", choices=BACKENDS, default=d.backend,
                   help="torch (CPU or CUDA), onnxruntime (model.onnx) or fused (compiled CPU kernel, "
                        "lowest latency at small batches) on the CPU; triton (CUDA: one fused block-sparse kernel "
                        "per layer)")
    p.add_argument("--variant", choices=("sparse", "dense"), default=d.variant,
                   help="dense: serve the dense twin of the same export (same function, dense weights), to compare "
                        "end to end")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device,
                   help="cuda: torch or triton backend on the GPU, each batch size bucket (powers of two up to "
                        "--max-batch) replayed as a CUDA graph")
    p.add_argument("--dtype", choices=ALL_DTYPES, default=d.dtype,
                   help="precision: torch/triton backends fp32, tf32, bf16, fp16; fused backend fp32, bf16, int8 "
                        "(AVX512-VNNI; inputs quantised per call) or int8-static (the export's calibrated scales, "
                        "faster). Check it first: python -m g2gserve.runtime.precision MODEL --backend B --dtype D")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="images per forward pass at most")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                   help="upper bound on how long a forward pass waits for admitted requests still being decoded "
                        "(a lone request never waits)")
    p.add_argument("--max-queue-ms", type=float, default=d.max_queue_ms,
                   help="a request whose estimated queueing is longer is answered 503 + Retry-After at once")
    p.add_argument("--max-queue", type=int, default=d.max_queue_images,
                   help="images admitted at most; beyond: 503 + Retry-After")
    p.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / 2**20, help="request body limit (413 beyond)")
    p.add_argument("--max-images", type=int, default=d.max_images_per_request, help="images per request at most")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads per worker")
    p.add_argument("--decode-threads", type=int, default=None,
                   help="image-decoding threads per worker (default: the cores this process may run on)")
    p.add_argument("--workers", type=int, default=1,
                   help="uvicorn worker processes (each loads the model; /metrics sums them; one calibration)")
    p.add_argument("--no-calibrate", action="store_true", help="skip the start-up sparse-vs-dense measurement")
    p.add_argument("--access-log", action="store_true",
                   help="log every request (off by default: a log line costs about as much as a small request)")
    p.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                   help="event loop (auto: uvloop when installed)")
    p.add_argument("--http", choices=("httptools", "h11"), default="httptools",
                   help="HTTP parser: httptools (with header bounds) or h11 (pure Python, no header bounds; for "
                        "comparisons only)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    hardening.add_arguments(p)
    return p


def _check_model(path: Path) -> str | None:
    """Refuse a missing, tampered or foreign model before starting uvicorn: the error message, or None."""
    from g2gserve.bundle import ExportError, read_bundle
    try:
        if path.is_dir():
            read_bundle(path)
        else:
            from g2gserve.model.checkpoint import CheckpointError, load_checkpoint  # a model.pt needs torch anyway
            try:
                load_checkpoint(path)
            except CheckpointError as e:
                return str(e)
    except ExportError as e:
        return str(e)
    return None


def _check_repository(root: Path) -> str | None:
    """A repository must exist and hold at least one DIR/<name>/<version>/ export (each is checked as it loads)."""
    from .oip.repository import discover
    if not root.is_dir():
        return f"{root}: no such model repository directory"
    if not discover(root):
        return f"{root}: no model in the repository (expected {root}/<name>/<version>/manifest.json)"
    return None


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.model is None) == (args.model_repository is None):
        parser.error("give one model (an export directory or model.pt) or --model-repository DIR")
    error = _check_model(args.model) if args.model is not None else _check_repository(args.model_repository)
    if error is not None:
        print(f"g2g-serve: error: {error}", file=sys.stderr)
        return 2
    try:
        if args.workers < 1:
            raise ValueError("--workers must be at least 1")
        repository = str(args.model_repository) if args.model_repository else None
        cfg = ServeConfig(model=str(args.model or ""), model_repository=repository, default_model=args.default_model,
                          backend=args.backend, variant=args.variant, device=args.device,
                          max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue_ms=args.max_queue_ms,
                          max_queue_images=args.max_queue, max_body_bytes=int(args.max_body_mb * 2**20),
                          max_images_per_request=args.max_images, threads=args.threads, dtype=args.dtype,
                          decode_threads=args.decode_threads, calibrate=not args.no_calibrate,
                          **hardening.config_kwargs(args))
        bounds = hardening.uvicorn_options(args)  # TLS, keep-alive, connection limit, header bounds (http=)
    except ValueError as e:
        print(f"g2g-serve: error: {e}", file=sys.stderr)
        return 2
    common = dict(host=args.host, port=args.port, timeout_graceful_shutdown=30, log_level=args.log_level,
                  access_log=args.access_log, loop=args.loop,  # auto: uvloop when installed
                  **bounds)  # http=: uvicorn's httptools protocol with header bounds (server/protocol.py)
    if args.http == "h11":  # the pure-Python parser, for comparisons (servebench): without the header bounds
        common["http"] = "h11"
    if args.workers == 1:
        hardening.exit_zero_on_sigterm()
        uvicorn.run(create_app(cfg), **common)
        return 0
    # Several workers: metrics summed through files (prometheus multiprocess mode), one calibration for all.
    shared = tempfile.mkdtemp(prefix="g2g-serve-")
    try:
        metrics_dir = os.path.join(shared, "metrics")
        os.mkdir(metrics_dir)
        os.environ[MULTIPROC_ENV] = metrics_dir
        os.environ[CONFIG_ENV] = dataclasses.replace(cfg, shared_dir=shared).to_json()
        # A worker imports torch/numba and loads the model before it answers uvicorn's health pings: allow for it.
        uvicorn.run("server.app:app_from_env", factory=True, workers=args.workers, timeout_worker_healthcheck=120,
                    **common)
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
