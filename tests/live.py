"""A real uvicorn server for the HTTP tests: a free loopback port, a thread, started once it answers."""
import socket
import threading
import time

import httpx
import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(app, ready: str = "/readyz", **options) -> tuple[uvicorn.Server, threading.Thread, int]:
    """uvicorn (with ``options``) serving ``app`` in a thread; returns (server, thread, port) once ``ready`` is 200
    (or after ~20 s: the test then fails on its own requests)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(400):
        try:
            if httpx.get(f"http://127.0.0.1:{port}{ready}").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    return server, thread, port
