"""The no-op ceiling for ``server.servebench``: the same FastAPI + uvicorn stack, no model. ``POST /classify``
reads the body and returns a small JSON, so ``/classify``'s req/s can be read as a fraction of what the HTTP
stack alone does on the same core."""
from __future__ import annotations

import argparse
import sys

from fastapi import FastAPI, Request

from .schemas import FastJSONResponse


def create_noop_app() -> FastAPI:
    app = FastAPI(title="g2gserve no-op ceiling", default_response_class=FastJSONResponse)

    @app.post("/classify")
    async def classify(request: Request):
        return {"ok": True, "bytes": len(await request.body())}

    @app.get("/healthz")
    @app.get("/readyz")
    async def ready():
        return {"status": "ok"}
    return app


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    p = argparse.ArgumentParser(prog="python -m server.noop", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    args = p.parse_args(argv)
    uvicorn.run(create_noop_app(), host=args.host, port=args.port, log_level="warning", access_log=False,
                loop="auto", http="auto")
    return 0


if __name__ == "__main__":
    sys.exit(main())
