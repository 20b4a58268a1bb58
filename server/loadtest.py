"""Load test of a running g2g-serve on THIS machine (loopback only), with real test images.

    python -m server.loadtest --url http://127.0.0.1:8000 --clients 16 --requests 10000

N concurrent clients send one PNG each per request until ``--requests`` are done or ``--max-seconds``
pass (both bounded). Reports throughput, latency p50/p95/p99, errors by status, accuracy against the
true labels, and the server's resident memory (from /metrics) sampled along the way.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from g2gserve.bench.measure import Latency
from g2gserve.data.datasets import DATASETS, DataError, load_split
from g2gserve.data.images import encode_png


def loopback_only(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as e:
        raise ValueError(f"cannot resolve {host!r}: {e}") from e
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise ValueError(f"{url} is not a loopback address; this load test only targets this machine")


async def _rss(client, url: str) -> float | None:
    r = await client.get(f"{url}/metrics")
    for line in r.text.splitlines():
        if line.startswith("process_resident_memory_bytes"):
            return float(line.split()[1])
    return None


async def run(url: str, payloads: list[tuple[bytes, int]], clients: int, requests: int, max_seconds: float) -> dict:
    import httpx

    latencies, statuses, correct, rss = [], {}, 0, []
    sent = 0
    deadline = time.perf_counter() + max_seconds
    lock = asyncio.Lock()
    async with httpx.AsyncClient(timeout=30.0, limits=httpx.Limits(max_connections=clients)) as client:
        rss.append((0, await _rss(client, url)))

        async def worker():
            nonlocal sent, correct
            while True:
                async with lock:
                    if sent >= requests or time.perf_counter() > deadline:
                        return
                    i = sent
                    sent += 1
                body, label = payloads[i % len(payloads)]
                t = time.perf_counter()
                try:
                    r = await client.post(f"{url}/classify?top_k=1", content=body, headers={"content-type": "image/png"})
                    status = r.status_code
                except httpx.HTTPError as e:
                    status = f"transport:{type(e).__name__}"
                    r = None
                latencies.append(time.perf_counter() - t)
                statuses[str(status)] = statuses.get(str(status), 0) + 1
                if r is not None and status == 200 and r.json()["predictions"][0]["class_id"] == label:
                    correct += 1
                if (i + 1) % 1000 == 0:
                    rss.append((i + 1, await _rss(client, url)))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - start
        rss.append((sent, await _rss(client, url)))
    lat = Latency.of(latencies)
    rss_values = [v for _, v in rss if v is not None]
    ok = statuses.get("200", 0)
    return {
        "url": url, "clients": clients, "requests": sent, "seconds": elapsed, "throughput_rps": sent / elapsed,
        "latency_ms": {"p50": lat.p50_ms, "p95": lat.p95_ms, "p99": lat.p99_ms, "mean": lat.mean_ms},
        "status": statuses, "server_errors_5xx": sum(v for k, v in statuses.items() if k.startswith("5")),
        "accuracy": correct / ok if ok else None,
        "rss_samples": rss, "rss_change": (rss_values[-1] - rss_values[1]) / rss_values[1] if len(rss_values) > 2 else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m server.loadtest", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients")
    p.add_argument("--requests", type=int, default=10_000, help="requests in all (bounded)")
    p.add_argument("--max-seconds", type=float, default=900, help="stop after this long in any case")
    p.add_argument("--dataset", choices=DATASETS, default="fashion-mnist")
    p.add_argument("--data-dir", type=Path, default=None, help="as for training.fit")
    p.add_argument("--images", type=int, default=1000, help="distinct test images cycled through")
    p.add_argument("--out", type=Path, default=None, help="write the report as JSON here too")
    args = p.parse_args(argv)
    try:
        loopback_only(args.url)
        test = load_split(args.dataset, "test", args.data_dir)
    except (ValueError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    payloads = [(encode_png(test.x[i]), int(test.y[i])) for i in range(min(args.images, len(test)))]
    report = asyncio.run(run(args.url.rstrip("/"), payloads, args.clients, args.requests, args.max_seconds))
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    rss = [v for _, v in report["rss_samples"] if v]
    print(f"\n{report['requests']} requests, {report['clients']} clients: {report['throughput_rps']:.0f} req/s, "
          f"p50 {report['latency_ms']['p50']:.1f} ms, p99 {report['latency_ms']['p99']:.1f} ms, "
          f"5xx {report['server_errors_5xx']}, accuracy {report['accuracy']:.2%}, server RSS "
          f"{rss[0] / 2**20:.0f} -> {rss[-1] / 2**20:.0f} MiB (change after warm-up "
          f"{report['rss_change'] if report['rss_change'] is not None else float('nan'):+.1%})")
    return 0 if report["server_errors_5xx"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
