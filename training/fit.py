"""Train a G2GNet (or a baseline) and write ``model.pt``, ``log.jsonl`` and a resumable ``state.pt``.

    python -m training.fit --dataset fashion-mnist --epochs 10 --out runs/fmnist-g2g
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from g2gserve.model.accounting import model_summary
from g2gserve.model.checkpoint import CheckpointError, from_model, safe_torch_load, save_checkpoint
from g2gserve.model.config import MODEL_KINDS, ModelConfig
from g2gserve.data.datasets import DATASETS, DataError, load_split, needs_augmentation
from g2gserve.fileio import atomic_write, atomic_write_text
from g2gserve.model.masks import GRANULARITIES, GROUPINGS
from g2gserve.model.g2gnet import build_model
from g2gserve.data.preprocess import Preprocess

from .dst import PRESETS, PRUNE, REGROW, SCHEDULES, DSTConfig, MaskScheduler
from .plots import plot_training
from .loop import cosine_lambda, epoch_generator, evaluate, resolve_device, train_epoch

DATASET_SHAPES = {"fashion-mnist": (1, 28, 10), "cifar10": (3, 32, 10), "cifar100": (3, 32, 100)}
STATE_VERSION = 1
# Flags that define the run: on --resume they must agree with the saved run.
RUN_FLAGS = ("dataset", "model", "grouping", "groups", "sparsity", "granularity", "block_size", "hidden",
             "epochs", "batch_size", "lr", "weight_decay", "seed", "dst", "prune", "regrow", "dst_interval",
             "dst_fraction", "dst_end", "dst_schedule")


def _widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1024,1024,1024, got {text!r}")
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"widths must be positive, got {text!r}")
    return widths


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.fit",
        description="Train a sparse modular G2GNet (or a dense/ER baseline) on Fashion-MNIST or CIFAR. "
                    "Writes OUT/model.pt (the model), OUT/log.jsonl (one line per epoch) and OUT/state.pt "
                    "(optimizer state for --resume).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--dataset", choices=DATASETS, default="fashion-mnist")
    d.add_argument("--data-dir", type=Path, default=None,
                   help="directory with the four Fashion-MNIST idx .gz files or train.npz/test.npz "
                        "(+ classes.json); nothing is downloaded when given. Default: the Debian "
                        "dataset-fashion-mnist directory if present, else torchvision's download")
    m = p.add_argument_group("model")
    m.add_argument("--model", choices=MODEL_KINDS, default="g2g",
                   help="g2g: sparse modular; dense: same widths; dense-params: dense with g2g's active "
                        "parameter count; er: same density, uniform random connections")
    m.add_argument("--grouping", choices=GROUPINGS, default="mixer",
                   help="how units are assigned to groups (mixer alternates contiguous/interleaved per layer)")
    m.add_argument("--groups", type=_positive(int), default=8, help="number of groups (ensembles) G per layer")
    m.add_argument("--sparsity", type=float, default=0.75, help="fraction of hidden-layer weights that are zero")
    m.add_argument("--granularity", choices=GRANULARITIES, default="block",
                   help="block: connections per b x b tile, what the fast block-sparse runtime serves; "
                        "edge: each connection drawn alone, as in the paper")
    m.add_argument("--block-size", type=_positive(int), default=64,
                   help="tile size b for --granularity block (must divide every group size)")
    m.add_argument("--hidden", type=_widths, default=(1024, 1024, 1024), help="hidden layer widths, comma-separated")
    s = p.add_argument_group("dynamic sparse training (sparse models only)")
    s.add_argument("--dst", choices=("auto", "none", *PRESETS), default="auto",
                   help="rewiring rule: set = magnitude prune + random regrow, rigl = + gradient regrow, "
                        "hebbian = + regrow where pre/post activity correlates; auto = hebbian for g2g, none otherwise")
    s.add_argument("--prune", choices=PRUNE, default=None, help="override the preset's prune criterion")
    s.add_argument("--regrow", choices=REGROW, default=None, help="override the preset's regrow criterion")
    s.add_argument("--dst-interval", type=_positive(int), default=200, help="optimizer steps between mask updates")
    s.add_argument("--dst-fraction", type=float, default=0.3, help="fraction of live edges moved per update, at first")
    s.add_argument("--dst-end", type=float, default=0.75, help="fraction of training after which the masks freeze")
    s.add_argument("--dst-schedule", choices=SCHEDULES, default="cosine",
                   help="cosine: fraction decays to 0 at --dst-end; constant: the same fraction every update")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=_positive(int), default=10, help="training epochs (the cosine schedule spans them)")
    t.add_argument("--batch-size", type=_positive(int), default=256, help="training batch size")
    t.add_argument("--lr", type=_positive(float), default=1e-3, help="Adam learning rate (cosine-decayed to 0)")
    t.add_argument("--weight-decay", type=float, default=1e-4, help="Adam L2 weight decay (pruned weights stay 0)")
    t.add_argument("--seed", type=int, default=0, help="seeds weights, masks, shuffling and augmentation")
    r = p.add_argument_group("run")
    r.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when available")
    r.add_argument("--threads", type=_positive(int), default=None, help="torch intra-op threads (default: torch's)")
    r.add_argument("--out", type=Path, default=None, help="output directory (default runs/DATASET-MODEL)")
    r.add_argument("--resume", action="store_true", help="continue the run saved in --out from its last finished epoch")
    r.add_argument("--stop-after", type=_positive(int), default=None, metavar="N",
                   help="stop after N epochs in this invocation (continue later with --resume)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def model_config(args: argparse.Namespace) -> ModelConfig:
    channels, size, classes = DATASET_SHAPES[args.dataset]
    return ModelConfig(kind=args.model, in_channels=channels, image_size=size, num_classes=classes,
                       hidden=tuple(args.hidden), groups=args.groups, grouping=args.grouping,
                       sparsity=args.sparsity, granularity=args.granularity, block_size=args.block_size,
                       mask_seed=args.seed)


def dst_config(args: argparse.Namespace) -> DSTConfig | None:
    """The rewiring rule the flags ask for, or None for static masks."""
    preset = args.dst
    if preset == "auto":
        preset = "hebbian" if args.model == "g2g" else "none"
    if preset == "none" and args.prune is None and args.regrow is None:
        return None
    if args.model not in ("g2g", "er"):
        raise ValueError(f"--dst {args.dst} needs a sparse model (g2g or er), not {args.model}")
    prune, regrow = PRESETS.get(preset, PRESETS["hebbian"])
    return DSTConfig(prune=args.prune or prune, regrow=args.regrow or regrow, interval=args.dst_interval,
                     fraction=args.dst_fraction, end=args.dst_end, schedule=args.dst_schedule)


def _run_flags(args: argparse.Namespace) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k in RUN_FLAGS}


def _explicit_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """Names of the flags the user typed (so --resume can reject only real conflicts)."""
    blank = argparse.Namespace(**{a.dest: None for a in parser._actions if a.dest != "help"})
    silent = build_parser()
    for a in silent._actions:
        a.default = None
    typed = silent.parse_args(argv, namespace=blank)
    return {k for k, v in vars(typed).items() if v not in (None, False)}


def summary_table(summary: dict, history: list[dict]) -> str:
    last = history[-1] if history else {}
    lines = [
        f"test accuracy      {last.get('test_acc', float('nan')) * 100:.2f}%  (epoch {last.get('epoch', 0)})",
        f"parameters         {summary['params']:,}",
        f"active parameters  {summary['active_params']:,}  ({summary['active_params'] / summary['params']:.1%})",
        f"MACs per image     dense {summary['macs_dense']:,}  sparse {summary['macs_sparse']:,}  "
        f"({summary['macs_dense'] / summary['macs_sparse']:.2f}x fewer)",
        "",
        f"{'layer':<10} {'shape':<18} {'density':>8} {'active':>10} {'MACs dense':>12} {'MACs sparse':>12}",
    ]
    for layer in summary["layers"]:
        shape = "x".join(str(s) for s in layer["shape"])
        lines.append(f"{layer['name']:<10} {shape:<18} {layer['density']:>8.4f} {layer['active']:>10,} "
                     f"{layer['macs_dense']:>12,} {layer['macs_sparse']:>12,}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    out = args.out or Path("runs") / f"{args.dataset}-{args.model}"
    state_path, model_path, log_path = out / "state.pt", out / "model.pt", out / "log.jsonl"

    state = None
    if args.resume:
        try:
            state = safe_torch_load(state_path, "training state")
        except CheckpointError as e:
            parser.error(f"--resume: {e}")
        saved = state.get("args", {})
        typed = _explicit_flags(parser, argv)
        conflicts = [f"--{k.replace('_', '-')} {_run_flags(args)[k]} (saved run: {saved.get(k)})"
                     for k in RUN_FLAGS if k in typed and _run_flags(args)[k] != saved.get(k)]
        if conflicts:
            parser.error("--resume: flags differ from the saved run: " + "; ".join(conflicts))
        for k in RUN_FLAGS:
            value = saved.get(k, getattr(args, k))
            setattr(args, k, tuple(value) if k == "hidden" else value)
    elif state_path.exists():
        parser.error(f"{out} already holds a run; pass --resume to continue it or choose another --out")

    try:
        cfg = model_config(args)
        dst = dst_config(args)
        device = resolve_device(args.device)
    except ValueError as e:
        parser.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)

    try:
        train = load_split(args.dataset, "train", args.data_dir)
        test = load_split(args.dataset, "test", args.data_dir)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    expected = (cfg.in_channels, cfg.image_size, cfg.image_size)
    if tuple(train.x.shape[1:]) != expected or tuple(test.x.shape[1:]) != expected:
        print(f"error: {args.dataset} images must be {expected}, the data has {tuple(train.x.shape[1:])}", file=sys.stderr)
        return 2
    if int(train.y.max()) >= cfg.num_classes or len(train.classes) != cfg.num_classes:
        cfg = dataclasses.replace(cfg, num_classes=max(len(train.classes), int(train.y.max()) + 1))
        train.classes = train.classes + [str(i) for i in range(len(train.classes), cfg.num_classes)]

    preprocess = Preprocess.fit(train.x)
    torch.manual_seed(args.seed)
    model = build_model(cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = -(-len(train) // args.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_lambda(args.epochs * steps_per_epoch))
    masks = MaskScheduler(model, optimizer, dst, args.epochs * steps_per_epoch, args.seed) if dst else None
    history: list[dict] = []
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if masks is not None:
                masks.load_state_dict(state["dst"])
            history = list(state["history"])
        except (KeyError, RuntimeError, ValueError) as e:
            print(f"error: {state_path}: damaged training state ({e})", file=sys.stderr)
            return 2
        print(f"resuming {out} after epoch {len(history)} of {args.epochs}")

    summary = model_summary(model)
    meta = {"dataset": args.dataset, "args": _run_flags(args), "dst": dst.to_dict() if dst else None}
    print(f"{cfg.kind} on {args.dataset}: {summary['active_params']:,} active of {summary['params']:,} parameters, "
          f"{len(train):,} train / {len(test):,} test images, device {device}, threads {torch.get_num_threads()}")
    ran = 0
    for epoch in range(len(history) + 1, args.epochs + 1):
        if args.stop_after is not None and ran >= args.stop_after:
            print(f"stopped after {ran} epoch(s); continue with --resume")
            return 0
        stats = train_epoch(model, train, preprocess, optimizer, scheduler, args.batch_size,
                            epoch_generator(args.seed, epoch), needs_augmentation(args.dataset), device,
                            desc=f"epoch {epoch}/{args.epochs}", progress=not args.no_progress)
        stats |= evaluate(model, test, preprocess, device)
        history.append({"epoch": epoch, **stats, "lr": scheduler.get_last_lr()[0], "time": time.time()})
        if masks is not None:
            meta["dst_records"] = masks.records
        ran += 1
        print(f"epoch {epoch:>3}/{args.epochs}  loss {stats['train_loss']:.4f}  train {stats['train_acc']:.2%}  "
              f"test {stats['test_acc']:.2%}  {stats['train_time_s']:.1f}s")
        save_checkpoint(model_path, from_model(model, train.classes, preprocess, history, args.seed, meta))
        state_dict = {"version": STATE_VERSION, "args": _run_flags(args), "history": history,
                      "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                      "scheduler": scheduler.state_dict(), "dst": masks.state_dict() if masks else None}
        atomic_write(state_path, lambda tmp: torch.save(state_dict, tmp))
        atomic_write_text(log_path, "".join(json.dumps(h) + "\n" for h in history))
        if masks is not None:
            atomic_write_text(out / "dst.jsonl", "".join(json.dumps(r) + "\n" for r in masks.records))
    print()
    print(summary_table(summary, history))  # DST keeps every layer's edge count, so the counts still hold
    if masks is not None and masks.records:
        last = {r["layer"]: r for r in masks.records}
        print("\nrewiring (" + f"{dst.prune} prune, {dst.regrow} regrow): "
              + ", ".join(f"hidden.{k} intra-group {r['intra_fraction']:.1%} turnover {r['turnover']:.1%}"
                          for k, r in last.items()))
    plot_training(history, masks.records if masks else [], out / "training.png")
    print(f"\nwrote {model_path}, {log_path} and {out / 'training.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
