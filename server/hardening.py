"""The bounds and guards of issue 14 in one place: what ``create_app`` installs and what uvicorn is given.

``harden(app, cfg)`` goes right after the body-limit middleware and before any middleware that
counts responses, so the counting middleware sees the JSON errors these produce. The order, from
the outside in: counting -> ErrorMiddleware (500 JSON) -> CORS -> DeadlineMiddleware (408/503) ->
body limit (413) -> routes. ``add_arguments`` / ``uvicorn_options`` are the CLI side.
"""
from __future__ import annotations

import argparse
import os
import signal
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from . import protocol
from .auth import API_KEY_HEADER
from .docs_assets import add_offline_docs
from .errors import install_error_handling
from .timeouts import DeadlineMiddleware


def harden(app: FastAPI, cfg: Any) -> None:
    """Install deadlines, CORS, JSON errors and offline /docs on ``app`` (``cfg``: a ``ServeConfig``)."""
    app.add_middleware(DeadlineMiddleware, body_timeout_s=cfg.body_timeout_s, request_timeout_s=cfg.request_timeout_s)
    if cfg.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Content-Type", "Authorization", API_KEY_HEADER])
    install_error_handling(app)
    add_offline_docs(app)
    service = getattr(app.state, "service", None)
    if service is not None:  # answers of the HTTP layer (server/protocol.py) in /metrics too
        service.metrics.registry.register(protocol.RefusalCollector())


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The security and time-bound flags of g2g-serve."""
    g = p.add_argument_group("security and bounds")
    g.add_argument("--admin-token", default=os.environ.get("G2G_ADMIN_TOKEN"),
                   help="enables POST /stats/calibrate and the v2 model load/unload (version swaps) for "
                        "'Authorization: Bearer TOKEN' (default: $G2G_ADMIN_TOKEN; without one, admin endpoints "
                        "do not exist or refuse)")
    g.add_argument("--api-key", default=os.environ.get("G2G_API_KEY"),
                   help=f"require this key in the {API_KEY_HEADER} header of /classify (default: $G2G_API_KEY)")
    g.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser requests from this origin (repeatable)")
    g.add_argument("--ssl-certfile", help="serve HTTPS with this certificate (PEM)")
    g.add_argument("--ssl-keyfile", help="... and this private key (PEM)")
    g.add_argument("--header-timeout", type=float, default=10.0, help="seconds to receive request headers (408)")
    g.add_argument("--max-header-kb", type=int, default=16, help="request header limit (431)")
    g.add_argument("--body-timeout", type=float, default=30.0, help="seconds to receive a request body (408)")
    g.add_argument("--request-timeout", type=float, default=60.0,
                   help="per-request deadline in seconds (503 + Retry-After)")
    g.add_argument("--keep-alive-timeout", type=float, default=5.0, help="idle keep-alive connections closed after")
    g.add_argument("--limit-concurrency", type=int, default=1000,
                   help="connections (and requests in flight) per worker; beyond: 503 + Retry-After")
    g.add_argument("--no-protocol-refusal", action="store_true",
                   help="answer admission refusals (503) through the app instead of in the HTTP protocol "
                        "(slower under overload; for comparisons)")


def config_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The ``ServeConfig`` fields that ``add_arguments`` set."""
    return dict(admin_token=args.admin_token or None, api_key=args.api_key or None,
                cors_origins=tuple(args.cors_origin), body_timeout_s=args.body_timeout,
                request_timeout_s=args.request_timeout)


def uvicorn_options(args: argparse.Namespace) -> dict[str, Any]:
    """``uvicorn.run`` keyword arguments: TLS, keep-alive, concurrency, and the guarded protocol."""
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        raise ValueError("--ssl-certfile and --ssl-keyfile go together")
    bounds = {"--header-timeout": args.header_timeout, "--max-header-kb": args.max_header_kb,
              "--body-timeout": args.body_timeout, "--request-timeout": args.request_timeout,
              "--keep-alive-timeout": args.keep_alive_timeout, "--limit-concurrency": args.limit_concurrency}
    for flag, value in bounds.items():
        if not value > 0:
            raise ValueError(f"{flag} must be positive, got {value}")
    options: dict[str, Any] = dict(timeout_keep_alive=args.keep_alive_timeout, limit_concurrency=args.limit_concurrency,
                                   http=protocol.configure(args.header_timeout, args.max_header_kb * 1024,
                                                          early_refusal=not args.no_protocol_refusal))
    if args.ssl_certfile:
        options.update(ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile)
    return options


def exit_zero_on_sigterm() -> None:
    """SIGTERM is the normal way to stop a server: exit 0 after uvicorn's graceful shutdown, not 143.

    uvicorn re-raises a captured signal once it has shut down; with Python's default SIGTERM
    disposition that kills the process (143), unlike ``--workers N`` (0). A handler that does
    nothing lets ``main`` return 0. Call it only in the main thread, before ``uvicorn.run``.
    """
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
