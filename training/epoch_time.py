"""Side-by-side epoch time of a sparse G2GNet and the dense network of the same widths.

Runs the two models' epochs interleaved (dense, g2g, dense, g2g, ...) in one process with the same
threads, so machine noise hits both alike, and reports medians and the per-pair ratio:

    python -m training.epoch_time --threads 2 --repeats 3
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys

import torch

from g2gserve.model.config import ModelConfig
from g2gserve.data.datasets import DATASETS, dataset_info, load_split
from g2gserve.model.g2gnet import build_model
from g2gserve.data.preprocess import Preprocess

from .distributed import resolve_device
from .dst import PRESETS, DSTConfig, MaskScheduler
from .loop import cosine_lambda, epoch_generator, train_epoch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.epoch_time", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, default="fashion-mnist")
    p.add_argument("--data-dir", default=None, help="as for training.fit")
    p.add_argument("--models", default="dense,g2g,g2g+hebbian",
                   help="comma-separated KIND[+DST] to compare, first is the reference; DST is set, rigl or hebbian")
    p.add_argument("--dst-interval", type=int, default=200, help="optimizer steps between mask updates")
    p.add_argument("--granularity", choices=("edge", "block"), default="edge")
    p.add_argument("--repeats", type=int, default=3, help="timed epochs per model (after one warm-up epoch each)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    train = load_split(args.dataset, "train", args.data_dir)
    pre = Preprocess.fit(train.x)
    train = train.to(device)
    info = dataset_info(args.dataset)
    base = ModelConfig(in_channels=info.channels, image_size=info.image_size, num_classes=info.num_classes,
                       granularity=args.granularity)
    runs = {}
    steps = -(-len(train) // args.batch_size) * (args.repeats + 1)
    for name in args.models.split(","):
        kind, _, rule = name.partition("+")
        torch.manual_seed(0)
        model = build_model(dataclasses.replace(base, kind=kind)).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_lambda(10**9))
        if rule:  # the scheduler hooks opt.step(); end=1.0 keeps it updating through every timed epoch
            prune, regrow = PRESETS[rule]
            MaskScheduler(model, opt, DSTConfig(prune=prune, regrow=regrow, interval=args.dst_interval, end=1.0), steps)
        runs[name] = (model, opt, sched, [])
    for rep in range(args.repeats + 1):  # rep 0 is warm-up
        for kind, (model, opt, sched, times) in runs.items():
            stats = train_epoch(model, train, pre, opt, sched, args.batch_size, epoch_generator(0, rep),
                                info.augment, device, desc=f"{kind} epoch {rep}")
            if rep:
                times.append(stats["train_time_s"])
            print(f"{kind:<14} {'warm-up' if rep == 0 else f'epoch {rep}'}  {stats['train_time_s']:.2f}s", flush=True)
    ref_kind = next(iter(runs))
    ref = runs[ref_kind][3]
    print(f"\n{args.dataset}, {args.threads} thread(s), device {device}, batch {args.batch_size}, "
          f"{args.granularity} masks, DST interval {args.dst_interval}")
    print(f"{'model':<14} {'median s':>9} {'min s':>7} {'ratio vs ' + ref_kind:>18} {'ratio vs row above':>19}")
    prev = ref
    for kind, (_, _, _, times) in runs.items():
        ratio = statistics.median(t / r for t, r in zip(times, ref))
        step = statistics.median(t / r for t, r in zip(times, prev))
        print(f"{kind:<14} {statistics.median(times):>9.2f} {min(times):>7.2f} {ratio:>17.3f}x {step:>18.3f}x")
        prev = times
    return 0


if __name__ == "__main__":
    sys.exit(main())
