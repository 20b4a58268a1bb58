"""Run as ``python -m g2gserve.bench.memprobe MODEL ...``: load, run one batch, print peak memory as JSON."""
from __future__ import annotations

import argparse
import json


def vm_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m g2gserve.bench.memprobe")
    p.add_argument("model")
    p.add_argument("--backend", default="torch")
    p.add_argument("--variant", default="sparse")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    import torch

    from g2gserve.runtime import load
    torch.set_num_threads(args.threads)
    model = load(args.model, backend=args.backend, device=args.device, variant=args.variant, threads=args.threads)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    images = torch.zeros(args.batch, *model.input_shape, dtype=torch.uint8)
    for _ in range(3):
        model.predict(images)
    out = {"vmhwm_bytes": vm_hwm_bytes()}
    if args.device == "cuda":
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
