"""The hostile-input suite of issue 14, against a g2g-serve this command starts on loopback.

    python -m server.chaos runs/demo/export --out docs/chaos.md

1. Each hostile case alone, on a fresh keep-alive connection: expected status, what came back, and
   whether a valid request on the same connection still works afterwards (where the server keeps it).
2. A mixed run: ``--clients`` keep-alive clients send ``--requests`` requests, valid and hostile mixed,
   bounded by ``--max-seconds``; counts 5xx, connection resets on valid and on hostile requests, and
   the server's resident memory after a warm-up and at the end.

Writes a markdown page (atomically) that the README's serving section links to; nothing in it is typed by hand.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import random
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from g2gserve.bench.measure import machine_info
from g2gserve.bench.memprobe import vm_rss_bytes
from g2gserve.fileio import atomic_write_text

from .servebench import free_port

HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0
MAX_BODY_MB = 1.0
RESETS = (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected, http.client.BadStatusLine)


# ------------------------------------------------------------------ request bodies
def _png(seed: int, mode: str = "L", bits: int = 8) -> bytes:
    g = np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint16)
    im = Image.fromarray((g * 257).astype(np.uint16)) if bits == 16 else Image.fromarray(g.astype(np.uint8), mode)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png() -> bytes:
    """A tiny PNG whose header claims 40000 x 40000 pixels (decompression bomb)."""
    import struct
    import zlib
    ihdr = struct.pack(">IIBBBBB", 40_000, 40_000, 8, 0, 0, 0, 0)
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data +  # noqa: E731
                                struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="GIF")
    return buf.getvalue()


JSON = {"Content-Type": "application/json"}


@dataclass
class Case:
    name: str
    expected: int
    method: str = "POST"
    path: str = "/classify"
    body: bytes = b""
    headers: dict | None = None
    raw: Callable[[int], tuple[int | None, str, float]] | None = None  # for what http.client cannot send


def hostile_cases(admin: bool) -> list[Case]:
    deep = b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    multipart_boundary = "chaosboundary"
    many_files = "".join(f'--{multipart_boundary}\r\nContent-Disposition: form-data; name="file"; filename="{i}.png"'
                         f"\r\nContent-Type: image/png\r\n\r\nx\r\n" for i in range(1000))
    many_files += f"--{multipart_boundary}--\r\n"
    many_fields = "".join(f'--{multipart_boundary}\r\nContent-Disposition: form-data; name="f{i}"\r\n\r\nx\r\n'
                          for i in range(2_000)) + f"--{multipart_boundary}--\r\n"
    cases = [
        Case("JSON nested 100,000 deep", 422, body=deep, headers=JSON),
        Case("integer with 100,000 digits", 422, body=b'{"images": [' + b"9" * 100_000 + b"]}", headers=JSON),
        Case("JSON array of 100,000 values", 413, body=b'{"images": [' + b"1," * 99_999 + b"1]}", headers=JSON),
        Case("JSON that is not an object", 422, body=b'"just a string"', headers=JSON),
        Case("invalid base64", 422, body=b'{"image": "***"}', headers=JSON),
        Case("not an image", 415, body=b"definitely not an image"),
        Case("truncated PNG", 422, body=_png(0)[:60]),
        Case("GIF (unsupported format)", 415, body=_gif()),
        Case("PNG claiming 40000x40000 pixels", 413, body=_bomb_png()),
        Case("empty body", 422),
        Case("1,000 multipart file fields", 413, body=many_files.encode(),  # images over the limit, as for JSON
             headers={"Content-Type": f"multipart/form-data; boundary={multipart_boundary}"}),
        Case("2,000 multipart fields", 400, body=many_fields.encode(),
             headers={"Content-Type": f"multipart/form-data; boundary={multipart_boundary}"}),
        Case("multipart without its closing boundary", 400, body=many_files.encode()[:-20],
             headers={"Content-Type": f"multipart/form-data; boundary={multipart_boundary}"}),
        Case("body over the limit (Content-Length)", 413, body=b"x" * int(MAX_BODY_MB * 2**20 + 1)),
        Case("top_k=0", 422, path="/classify?top_k=0", body=_png(1)),
        Case("top_k with 5,000 digits", 422, path="/classify?top_k=" + "9" * 5_000, body=_png(1)),
        Case("URL of 100,000 characters", 431, path="/classify?top_k=" + "9" * 100_000, body=_png(1)),
        Case("16-bit grey PNG (valid)", 200, body=_png(2, bits=16)),
        Case("unknown path", 404, method="GET", path="/nope"),
        Case("wrong method", 405, method="GET", path="/classify"),
        Case("POST /stats/calibrate without the admin token", 401 if admin else 404, path="/stats/calibrate"),
        Case("headers sent 2 bytes a second", 408, raw=_slow_headers),
        Case("body sent 2 bytes a second", 408, raw=_slow_body),
        Case("100 KB header in 10 KB pieces", 431, raw=_huge_header),
        Case("malformed request line", 400, raw=_malformed),
    ]
    return cases


# ------------------------------------------------------------------ raw-socket cases
def _exchange(port: int, pieces: list[bytes], pause: float) -> tuple[int | None, str, float]:
    start = time.monotonic()
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            for piece in pieces:
                s.sendall(piece)
                if pause:
                    time.sleep(pause)
                    s.setblocking(False)
                    try:
                        data += s.recv(65536)  # answered already?
                    except (BlockingIOError, ConnectionResetError):
                        pass
                    s.setblocking(True)
                    s.settimeout(10)
                    if data:
                        break
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            while chunk := s.recv(65536):
                data += chunk
        except (socket.timeout, ConnectionResetError):
            pass
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split()[1]) if head.startswith(b"HTTP/") else None
    return status, body.decode("utf-8", "replace"), time.monotonic() - start


def _slow_headers(port: int):
    request = b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 10\r\n\r\n"
    return _exchange(port, [request[i:i + 2] for i in range(0, len(request), 2)], pause=1.0)


def _slow_body(port: int):
    head = b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n"
    return _exchange(port, [head] + [b"xx"] * 500, pause=1.0)


def _huge_header(port: int):
    return _exchange(port, [b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: "] + [b"a" * 10_000] * 10 + [b"\r\n\r\n"],
                     pause=0.05)


def _malformed(port: int):
    return _exchange(port, [b"GARBAGE\x00 / HTTP/9\r\n\r\n"], pause=0)


# ------------------------------------------------------------------ the server
class Server:
    """g2g-serve MODEL in a subprocess on a free loopback port, with short timeouts (so slow cases are quick)."""

    def __init__(self, model: str, admin_token: str | None, extra: list[str]):
        self.port = free_port()
        self.args = ["--threads", "1", "--no-calibrate", "--header-timeout", f"{HEADER_TIMEOUT_S:g}",
                     "--body-timeout", f"{BODY_TIMEOUT_S:g}", "--max-body-mb", f"{MAX_BODY_MB:g}", *extra]
        # one argument with '=': a random token may start with '-', which argparse would take for an option
        token = [f"--admin-token={admin_token}"] if admin_token else []
        self.log = tempfile.TemporaryFile()  # a file, not a pipe: a full pipe would stall the server
        self.proc = subprocess.Popen([sys.executable, "-m", "server.cli", model, "--port", str(self.port),
                                      *self.args, *token], stdout=subprocess.DEVNULL, stderr=self.log)
        for _ in range(600):
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"g2g-serve exited: {self.log.read().decode(errors='replace')[-2000:]}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", "/readyz")
                if c.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("g2g-serve did not become ready in 60 s")

    def rss_bytes(self) -> int:
        return vm_rss_bytes(self.proc.pid)

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self.log.close()


# ------------------------------------------------------------------ 1. the suite
@dataclass
class Outcome:
    case: Case
    status: int | None
    answer: str
    seconds: float
    kept: str  # "yes", "closed by the server" (with Connection: close) or "reset"

    @property
    def ok(self) -> bool:
        return self.status == self.case.expected and self.kept != "reset"


def _send(conn: http.client.HTTPConnection, case: Case) -> tuple[int, bytes, bool]:
    try:
        conn.request(case.method, case.path, body=case.body or None, headers=case.headers or {})
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered (413) and closed before the whole body was out: its answer is still readable
    r = conn.getresponse()  # no answer at all: RemoteDisconnected, counted as a reset
    return r.status, r.read(), (r.getheader("connection") or "").lower() == "close"


def run_case(port: int, case: Case, valid: bytes) -> Outcome:
    if case.raw is not None:
        status, answer, seconds = case.raw(port)
        return Outcome(case, status, answer, seconds, "closed by the server")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    start = time.monotonic()
    try:
        status, body, closed = _send(conn, case)
    except RESETS as e:
        return Outcome(case, None, f"{type(e).__name__}", time.monotonic() - start, "reset")
    seconds = time.monotonic() - start
    kept = "closed by the server"
    if not closed:
        try:
            follow = _send(conn, Case("valid", 200, body=valid))
            kept = "yes" if follow[0] == 200 else f"next request got {follow[0]}"
        except RESETS:
            kept = "reset"
    conn.close()
    return Outcome(case, status, body.decode("utf-8", "replace"), seconds, kept)


# ------------------------------------------------------------------ 2. the mixed run
@dataclass
class Mixed:
    requests: int = 0
    valid: int = 0
    hostile: int = 0
    server_errors: int = 0
    resets_valid: int = 0
    resets_hostile: int = 0
    unexpected: int = 0  # a status other than the case's expected one
    seconds: float = 0.0
    rss_before: int = 0
    rss_after: int = 0


def mixed_run(server: Server, requests: int, clients: int, max_seconds: float, hostile_share: float,
              seed: int = 0) -> Mixed:
    cheap = [c for c in hostile_cases(admin=True) if c.raw is None and c.expected != 200
             and c.name not in ("body over the limit (Content-Length)", "POST /stats/calibrate without the admin token")]
    valid = [Case("valid", 200, body=_png(1000 + i)) for i in range(32)]
    valid += [Case("valid JSON", 200, body=json.dumps({"images": [base64.b64encode(_png(i)).decode()
                                                                  for i in range(4)]}).encode(), headers=JSON)]
    result, lock = Mixed(), threading.Lock()
    counter = iter(range(requests))
    deadline = time.monotonic() + max_seconds

    def client(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        while time.monotonic() < deadline:
            with lock:
                if next(counter, None) is None:
                    break
            hostile = rng.random() < hostile_share
            case = rng.choice(cheap if hostile else valid)
            try:
                status, _, _ = _send(conn, case)
                reset = False
            except RESETS + (ConnectionRefusedError,):
                status, reset = None, True
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            with lock:
                result.requests += 1
                result.hostile += hostile
                result.valid += not hostile
                result.server_errors += status is not None and status >= 500
                result.unexpected += status is not None and status != case.expected
                if reset:
                    result.resets_hostile += hostile
                    result.resets_valid += not hostile
        conn.close()

    warm = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    for i in range(50):  # warm-up, so the memory baseline is the steady state
        _send(warm, valid[i % len(valid)])
        _send(warm, cheap[i % len(cheap)])
    warm.close()
    result.rss_before = server.rss_bytes()
    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    result.seconds = time.monotonic() - start
    result.rss_after = server.rss_bytes()
    return result


# ------------------------------------------------------------------ the page
def _cell(text: str, width: int = 90) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= width else text[:width - 1] + "…"


def render(model: str, server_args: list[str], outcomes: list[Outcome], mixed: Mixed, clients: int,
           hostile_share: float) -> str:
    info = machine_info()
    lines = ["# Hostile clients: what g2g-serve answers", "",
             f"Generated by `python -m server.chaos {model} ...` on {time.strftime('%Y-%m-%d %H:%M')}; do not edit by hand.",
             f"Machine: {info['cpu']}, {info['isa']}, {info['cores']} cores; Python {info['python']}, "
             f"torch {info['torch']}.", f"Server: `g2g-serve MODEL {' '.join(server_args)}` on loopback.", "",
             "## Each hostile case alone", "",
             "A fresh keep-alive connection per case; \"connection afterwards\" is whether a valid request on the "
             "same connection then got 200.", "",
             "| case | expected | got | seconds | connection afterwards | answer (start) |", "|---|---|---|---|---|---|"]
    for o in outcomes:
        mark = "" if o.ok else " **(unexpected)**"
        lines.append(f"| {o.case.name} | {o.case.expected} | {o.status}{mark} | {o.seconds:.2f} | {o.kept} | "
                     f"`{_cell(o.answer)}` |")
    ok = sum(o.ok for o in outcomes)
    m = mixed
    lines += ["", f"{ok} of {len(outcomes)} cases answered as expected.", "", "## Mixed run", "",
              f"{clients} keep-alive clients, {hostile_share:.0%} of the requests hostile (the cases above that need "
              "no raw socket), the rest valid PNG or JSON requests; resident memory of the server process after a "
              "warm-up and at the end.", "",
              "| requests | valid | hostile | 5xx | resets on valid requests | resets on hostile requests | "
              "unexpected statuses | seconds | RSS after warm-up (MiB) | RSS at the end (MiB) |",
              "|---|---|---|---|---|---|---|---|---|---|",
              f"| {m.requests} | {m.valid} | {m.hostile} | {m.server_errors} | {m.resets_valid} | {m.resets_hostile} | "
              f"{m.unexpected} | {m.seconds:.1f} | {m.rss_before / 2**20:.1f} | {m.rss_after / 2**20:.1f} |", ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m server.chaos", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="export directory or model.pt to serve")
    p.add_argument("--out", type=Path, default=Path("docs/chaos.md"), help="markdown page to write")
    p.add_argument("--requests", type=int, default=3000, help="requests in the mixed run")
    p.add_argument("--clients", type=int, default=8, help="concurrent keep-alive clients in the mixed run")
    p.add_argument("--max-seconds", type=float, default=120.0, help="bound on the mixed run")
    p.add_argument("--hostile-share", type=float, default=0.3, help="share of hostile requests in the mixed run")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    admin = secrets.token_urlsafe(16)
    server = Server(args.model, admin, [])
    try:
        valid = _png(7)
        outcomes = [run_case(server.port, case, valid) for case in hostile_cases(admin=True)]
        for o in outcomes:
            print(f"{'ok ' if o.ok else 'BAD'} {o.case.name}: expected {o.case.expected}, got {o.status}, "
                  f"connection: {o.kept}", file=sys.stderr)
        mixed = mixed_run(server, args.requests, args.clients, args.max_seconds, args.hostile_share)
    finally:
        exit_code = server.stop()
    print(f"mixed run: {mixed}; server exit code {exit_code}", file=sys.stderr)
    atomic_write_text(args.out, render(args.model, server.args + ["--admin-token ..."], outcomes, mixed,
                                       args.clients, args.hostile_share))
    if args.json:
        atomic_write_text(args.json, json.dumps({
            "cases": [{"case": o.case.name, "expected": o.case.expected, "status": o.status, "ok": o.ok,
                       "connection": o.kept, "seconds": o.seconds} for o in outcomes],
            "mixed": mixed.__dict__, "server_exit_code": exit_code}, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)
    clean = all(o.ok for o in outcomes) and mixed.server_errors == 0 and mixed.resets_valid == 0
    return 0 if clean and exit_code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
