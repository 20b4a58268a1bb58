"""Total training throughput with N cells sharing one device: epochs/s for each N, written as markdown.

    python -m training.concurrency --device cuda --jobs 1,4,8 --epochs 3 --out docs/training-concurrency.md

For each N, N ``python -m training.fit`` processes (seeds 0..N-1, one thread each, the same model)
start at once; a cell's epoch time comes from its ``log.jsonl`` (first epoch dropped: warm-up), the
total throughput is N x epochs / wall time. Near-linear scaling means total epochs/s grows with N
while each cell's epoch time stays near the single cell's.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from g2gserve.bench.measure import machine_info
from g2gserve.fileio import atomic_write_text


def run_n(n: int, args: argparse.Namespace, work: Path) -> dict:
    """Train ``n`` cells at once; their wall time and per-epoch times."""
    procs, outs = [], []
    start = time.perf_counter()
    for seed in range(n):
        out = work / f"n{n}" / f"seed{seed}"
        outs.append(out)
        cmd = [sys.executable, "-m", "training.fit", "--dataset", args.dataset, "--epochs", str(args.epochs),
               "--seed", str(seed), "--device", args.device, "--threads", "1", "--no-progress", "--out", str(out),
               *(["--data-dir", str(args.data_dir)] if args.data_dir else []), *args.fit_args.split()]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    errors = [p.communicate()[1] for p in procs]
    wall = time.perf_counter() - start
    for p, err in zip(procs, errors):
        if p.returncode:
            raise RuntimeError(f"training.fit exited {p.returncode}: {err[-1000:]}")
    epoch_s = [h["train_time_s"] for out in outs
               for h in (json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()) if h["epoch"] > 1]
    return {"cells": n, "wall_s": wall, "epochs_per_s": n * args.epochs / wall,
            "cell_epoch_s": statistics.median(epoch_s) if epoch_s else float("nan")}


def table(rows: list[dict], args: argparse.Namespace, argv: list[str]) -> str:
    info = machine_info()
    gpu = torch.cuda.get_device_name() if args.device != "cpu" and torch.cuda.is_available() else "none"
    base = rows[0]
    lines = ["# Training throughput with concurrent cells on one device", "",
             f"Produced by `python -m training.concurrency {' '.join(argv)}`.",
             f"Machine: {info['cpu']} ({os.cpu_count()} cores), GPU: {gpu}, torch {info['torch']}; "
             f"{args.dataset}, `training.fit {args.fit_args}` defaults otherwise, {args.epochs} epochs per cell, "
             "one thread per cell. Cell epoch time: median over cells and epochs after the first.", "",
             "Total epochs/s counts process start, data loading and evaluation; steady epochs/s is cells / cell epoch "
             "time, the training loop alone.", "",
             "| concurrent cells | wall (s) | total epochs/s | x one cell | cell epoch time (s) | steady epochs/s | x one cell |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['cells']} | {r['wall_s']:.1f} | {r['epochs_per_s']:.2f} | "
                     f"{r['epochs_per_s'] / base['epochs_per_s']:.2f} | {r['cell_epoch_s']:.2f} | "
                     f"{r['cells'] / r['cell_epoch_s']:.2f} | {r['cells'] / r['cell_epoch_s'] * base['cell_epoch_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m training.concurrency", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--jobs", default="1,4,8", help="numbers of concurrent cells to measure, comma-separated")
    p.add_argument("--epochs", type=int, default=3, help="epochs per cell (the first is not timed per cell)")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", type=Path, default=None, help="as for training.fit")
    p.add_argument("--device", default="auto")
    p.add_argument("--fit-args", default="", help="extra training.fit flags for every cell")
    p.add_argument("--out", type=Path, default=None, help="markdown report (default: print only)")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="g2g-concurrency-") as work:
        for n in (int(j) for j in args.jobs.split(",")):
            rows.append(run_n(n, args, Path(work)))
            print(f"{n} cell(s): {rows[-1]['epochs_per_s']:.2f} epochs/s in total, "
                  f"{rows[-1]['cell_epoch_s']:.2f} s per cell epoch", flush=True)
    text = table(rows, args, argv)
    if args.out:
        atomic_write_text(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
