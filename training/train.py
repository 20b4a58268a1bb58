"""``train(cfg) -> Checkpoint``: one training run, read top to bottom (the CLI in ``fit.py`` only parses).

Writes into ``cfg.out``: ``model.pt`` (the checkpoint, which stores ``cfg``), ``log.jsonl`` (one line
per epoch), ``dst.jsonl`` (mask updates), ``training.png`` and ``state.pt`` (optimizer, schedule and DST
state for ``resume``). Under torchrun every rank trains and rank 0 writes; files record the world size.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from g2gserve.data.datasets import ImageSet, dataset_info, load_split
from g2gserve.data.preprocess import Preprocess
from g2gserve.fileio import atomic_write, atomic_write_text
from g2gserve.model.accounting import model_summary
from g2gserve.model.checkpoint import (Checkpoint, CheckpointError, check_groups, from_model, safe_torch_load,
                                      save_checkpoint)
from g2gserve.model.config import ModelConfig
from g2gserve.model.g2gnet import build_model

from .config import ConfigError, TrainConfig
from .distributed import World
from .dst import MaskScheduler
from .loop import cosine_lambda, epoch_generator, evaluate, train_epoch
from .plots import plot_training

STATE_VERSION = 2  # 1 stored the run flags under "args"; 2 stores TrainConfig.to_dict() under "config"


class TrainError(RuntimeError):
    """The run cannot go on (data of the wrong shape, damaged state); the message says why."""


def saved_config(out: Path) -> dict:
    """The defining settings of the run saved in ``out`` (raises ConfigError when there is none)."""
    try:
        state = safe_torch_load(Path(out) / "state.pt", "training state")
    except CheckpointError as e:
        raise ConfigError(f"--resume: {e}") from e
    return _state_config(state)


def _state_config(state: dict) -> dict:
    if state.get("version") == 1:  # run flags; augmentation was then fixed by the data set
        args = dict(state.get("args") or {})
        return args | {"augment": dataset_info(args.get("dataset", "fashion-mnist")).augment}
    return dict(state.get("config") or {})


def _check_out(cfg: TrainConfig) -> dict | None:
    """The saved state to resume from (None for a fresh run), after checking it is the same run."""
    state_path = cfg.out / "state.pt"
    if not cfg.resume:
        if state_path.exists():
            raise ConfigError(f"{cfg.out} already holds a run; pass --resume to continue it or choose another --out")
        return None
    try:
        state = safe_torch_load(state_path, "training state")
    except CheckpointError as e:
        raise ConfigError(f"--resume: {e}") from e
    differ = cfg.differences(_state_config(state))
    if differ:
        raise ConfigError("--resume: settings differ from the saved run: "
                          + "; ".join(f"{k} {ours} (saved run: {saved})" for k, (ours, saved) in differ.items()))
    return state


def _load_data(cfg: TrainConfig, mc: ModelConfig) -> tuple[ImageSet, ImageSet, ModelConfig]:
    """Both splits, checked against the registry's shape; extra classes in the labels widen the head."""
    train = load_split(cfg.dataset, "train", cfg.data_dir)
    test = load_split(cfg.dataset, "test", cfg.data_dir)
    expected = (mc.in_channels, mc.image_size, mc.image_size)
    if tuple(train.x.shape[1:]) != expected or tuple(test.x.shape[1:]) != expected:
        raise TrainError(f"{cfg.dataset} images must be {expected}, the data has {tuple(train.x.shape[1:])}")
    if int(train.y.max()) >= mc.num_classes or len(train.classes) != mc.num_classes:
        mc = dataclasses.replace(mc, num_classes=max(len(train.classes), int(train.y.max()) + 1))
        train.classes = train.classes + [str(i) for i in range(len(train.classes), mc.num_classes)]
    return train, test, mc


def train(cfg: TrainConfig) -> Checkpoint:
    """Train (or, with ``cfg.resume``, continue) the run ``cfg`` describes; returns its last checkpoint."""
    try:
        world = World.from_env(cfg.device)
    except ValueError as e:  # --device cuda on a machine without one
        raise ConfigError(str(e)) from e
    try:
        ckpt = _train(cfg, world)
        world.barrier()  # ranks leave together: none tears the group down while rank 0 still writes
        return ckpt
    finally:
        world.close()


def _train(cfg: TrainConfig, world: World) -> Checkpoint:
    state = _check_out(cfg)
    world.barrier()  # no rank writes before every rank has checked the output directory
    say = print if world.is_main else (lambda *a, **k: None)
    device, dst = world.device, cfg.dst_config()
    for line in cfg.advice():
        say(f"note: {line}", file=sys.stderr)
    # On CUDA the host only launches kernels: idle intra-op threads would spin on the cores that other
    # cells sharing the GPU need (one cause of 8 concurrent cells running 30x slower than one).
    threads = cfg.threads or (1 if device.type == "cuda" else None)
    if threads:
        torch.set_num_threads(threads)
    train_set, test_set, mc = _load_data(cfg, cfg.model_config())
    preprocess = Preprocess.fit(train_set.x)
    train_set, test_set = train_set.to(device), test_set.to(device)  # batches are cut on the device

    torch.manual_seed(cfg.seed)
    model = build_model(mc).to(device)
    if state is not None and "groups" in state:  # the saved run's unit groups, not a fresh draw
        try:
            check_groups(mc, state["groups"])
        except ValueError as e:
            raise TrainError(f"{cfg.out / 'state.pt'}: damaged training state ({e})") from e
        model.groups = state["groups"]
    net = world.wrap(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = cfg.epochs * -(-len(train_set) // cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_lambda(total_steps))
    masks = MaskScheduler(model, optimizer, dst, total_steps, cfg.seed, world) if dst else None
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
            raise TrainError(f"{cfg.out / 'state.pt'}: damaged training state ({e})") from e
        say(f"resuming {cfg.out} after epoch {len(history)} of {cfg.epochs}")

    summary = model_summary(model)
    meta = {"dataset": cfg.dataset, "train_config": cfg.to_dict(), "world_size": world.size,
            "dst": dst.to_dict() if dst else None}
    say(f"{mc.kind} on {cfg.dataset}: {summary['active_params']:,} active of {summary['params']:,} parameters, "
        f"{len(train_set):,} train / {len(test_set):,} test images, device {device}, threads {torch.get_num_threads()}"
        + (f", {world.size} ranks" if world.size > 1 else ""))
    ckpt = from_model(model, train_set.classes, preprocess, history, cfg.seed, meta)
    ran = 0
    for epoch in range(len(history) + 1, cfg.epochs + 1):
        if cfg.stop_after is not None and ran >= cfg.stop_after:
            say(f"stopped after {ran} epoch(s); continue with --resume")
            return ckpt
        stats = train_epoch(net, train_set, preprocess, optimizer, scheduler, cfg.batch_size,
                            epoch_generator(cfg.seed, epoch), cfg.augment, device,
                            desc=f"epoch {epoch}/{cfg.epochs}", progress=cfg.progress and world.is_main, world=world)
        stats |= evaluate(model, test_set, preprocess, device, world=world)
        history.append({"epoch": epoch, **stats, "lr": scheduler.get_last_lr()[0], "time": time.time(),
                        "world_size": world.size})
        ran += 1
        say(f"epoch {epoch:>3}/{cfg.epochs}  loss {stats['train_loss']:.4f}  train {stats['train_acc']:.2%}  "
            f"test {stats['test_acc']:.2%}  {stats['train_time_s']:.1f}s")
        if masks is not None:
            meta["dst_records"] = masks.records
        ckpt = from_model(model, train_set.classes, preprocess, history, cfg.seed, meta)
        dst_state = masks.state_dict() if masks else None  # a collective under torchrun: every rank calls it
        if world.is_main:
            _write(cfg, ckpt, history, masks, {
                "version": STATE_VERSION, "config": cfg.to_dict(), "world_size": world.size, "history": history,
                "model": model.state_dict(), "groups": ckpt.groups, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "dst": dst_state})
    if world.is_main:
        _report(summary, history, masks)
        plot_training(history, masks.records if masks else [], cfg.out / "training.png")
        print(f"\nwrote {cfg.out / 'model.pt'}, {cfg.out / 'log.jsonl'} and {cfg.out / 'training.png'}")
    return ckpt


def _write(cfg: TrainConfig, ckpt: Checkpoint, history: list[dict], masks: MaskScheduler | None, state: dict) -> None:
    """Everything one finished epoch leaves on disk, each file written atomically."""
    save_checkpoint(cfg.out / "model.pt", ckpt)
    atomic_write(cfg.out / "state.pt", lambda tmp: torch.save(state, tmp))
    atomic_write_text(cfg.out / "log.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    if masks is not None:
        atomic_write_text(cfg.out / "dst.jsonl", "".join(json.dumps(r) + "\n" for r in masks.records))


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


def _report(summary: dict, history: list[dict], masks: MaskScheduler | None) -> None:
    print()
    print(summary_table(summary, history))  # DST keeps every layer's edge count, so the counts still hold
    if masks is not None and masks.records:
        last = {r["layer"]: r for r in masks.records}
        print("\nrewiring (" + f"{masks.cfg.prune} prune, {masks.cfg.regrow} regrow): "
              + ", ".join(f"hidden.{k} intra-group {r['intra_fraction']:.1%} turnover {r['turnover']:.1%}"
                          for k, r in last.items()))
