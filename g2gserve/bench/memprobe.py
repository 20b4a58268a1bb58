"""Run as ``python -m g2gserve.bench.memprobe MODEL ...``: load, warm up, serve a fixed request mix, print peak
memory (VmHWM) as JSON.

``--slim`` blocks ``import torch`` (``sys.modules["torch"] = None``) before anything is imported, so the figure
is that of a slim serving process (``pip install 'g2gserve[serve]'``, onnxruntime or fused backend); a model
that needed torch would fail the probe instead of silently counting it.
"""
from __future__ import annotations

import argparse
import json
import sys

SLIM_BACKENDS = ("onnxruntime", "fused")


def _status_bytes(field: str, pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def vm_hwm_bytes(pid: int | str = "self") -> int:
    """Peak resident memory of this process (or of process ``pid``)."""
    return _status_bytes("VmHWM", pid)


def vm_rss_bytes(pid: int | str = "self") -> int:
    """Resident memory of this process (or of process ``pid``) now."""
    return _status_bytes("VmRSS", pid)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m g2gserve.bench.memprobe")
    p.add_argument("model")
    p.add_argument("--backend", default="torch")
    p.add_argument("--variant", default="sparse")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--requests", type=int, default=3,
                   help="requests after warm-up, alternating batch 1 and --batch (a fixed mix)")
    p.add_argument("--slim", action="store_true", help="torch blocked: the process of a [serve]-only install")
    args = p.parse_args()
    if args.slim:
        if args.backend not in SLIM_BACKENDS or args.device != "cpu":
            p.error(f"--slim runs the {' or '.join(SLIM_BACKENDS)} backend on the CPU")
        sys.modules["torch"] = None  # type: ignore[assignment]  # any import of torch now fails
    import numpy as np

    from g2gserve.runtime import load
    if not args.slim:
        import torch
        torch.set_num_threads(args.threads)
    model = load(args.model, backend=args.backend, device=args.device, variant=args.variant, threads=args.threads)
    cuda = args.device == "cuda"
    if cuda:
        import torch
        torch.cuda.reset_peak_memory_stats()
    images = np.random.default_rng(0).integers(0, 256, (args.batch, *model.input_shape), dtype=np.uint8)
    for n in (1, args.batch):  # warm-up
        model.predict(images[:n])
    trace = []  # resident memory after each tenth of the requests: flat means no growth per request
    for i in range(args.requests):
        model.predict(images[:1] if i % 2 else images)
        if (i + 1) % max(1, args.requests // 10) == 0:
            trace.append(vm_rss_bytes())
    out = {"vmhwm_bytes": vm_hwm_bytes(), "rss_trace_bytes": trace, "requests": args.requests, "slim": args.slim,
           "torch_imported": sys.modules.get("torch") is not None}
    if cuda:
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
