"""The training CLI: flags -> ``TrainConfig`` -> ``train(cfg)``. Run alone or under torchrun:

    python -m training.fit --dataset fashion-mnist --epochs 10 --out runs/fmnist-g2g
    torchrun --nproc_per_node 2 -m training.fit --device cpu --out runs/fmnist-ddp
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from g2gserve.data.datasets import DATASETS, DataError
from g2gserve.model.config import MODEL_KINDS
from g2gserve.model.masks import GRANULARITIES, GROUPINGS

from .config import ConfigError, TrainConfig
from .dst import PRESETS, PRUNE, REGROW, SCHEDULES
from .train import TrainError, saved_config, train

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


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


def _flag(group, name: str, help: str, dest: str | None = None, **kw) -> None:
    """A flag whose default lives in TrainConfig: unset flags stay out of the parsed namespace, so
    --resume can tell the settings typed now from the saved run's."""
    dest = dest or name.lstrip("-").replace("-", "_")
    default = _DEFAULTS[dest]
    if isinstance(default, tuple):
        default = ",".join(map(str, default))
    shown = "" if default is None or kw.get("action") == "store_false" else f" (default: {default})"
    group.add_argument(name, dest=dest, default=argparse.SUPPRESS, help=help + shown, **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.fit",
        description="Train a sparse modular G2GNet (or a dense/ER baseline) on Fashion-MNIST or CIFAR. "
                    "Writes OUT/model.pt (the model), OUT/log.jsonl (one line per epoch) and OUT/state.pt "
                    "(optimizer state for --resume). Under torchrun (torchrun --nproc_per_node N -m training.fit "
                    "...) every rank trains a DistributedDataParallel shard of each batch and rank 0 writes.")
    d = p.add_argument_group("data")
    _flag(d, "--dataset", "data set", choices=DATASETS)
    _flag(d, "--data-dir", "directory with the four Fashion-MNIST idx .gz files or train.npz/test.npz "
                           "(+ classes.json); nothing is downloaded when given. Default: the Debian "
                           "dataset-fashion-mnist directory if present, else torchvision's download", type=Path)
    _flag(d, "--augment", "random crop (pad 4) and horizontal flip of training images; default: on for CIFAR, "
                          "off for Fashion-MNIST", action=argparse.BooleanOptionalAction)
    m = p.add_argument_group("model")
    _flag(m, "--model", "g2g: sparse modular; dense: same widths; dense-params: dense with g2g's active "
                        "parameter count; er: same density, uniform random connections", choices=MODEL_KINDS)
    _flag(m, "--grouping", "how units are assigned to groups (mixer alternates contiguous/interleaved per layer)",
          choices=GROUPINGS)
    _flag(m, "--groups", "number of groups (ensembles) G per layer", type=_positive(int))
    _flag(m, "--sparsity", "fraction of hidden-layer weights that are zero", type=float)
    _flag(m, "--granularity", "block: connections per b x b tile, what the fast block-sparse runtime serves; "
                              "edge: each connection drawn alone, as in the paper", choices=GRANULARITIES)
    _flag(m, "--block-size", "tile size b for --granularity block (must divide every group size)", type=_positive(int))
    _flag(m, "--hidden", "hidden layer widths, comma-separated", type=_widths)
    s = p.add_argument_group("dynamic sparse training (sparse models only)")
    _flag(s, "--dst", "rewiring rule: set = magnitude prune + random regrow, rigl = + gradient regrow, "
                      "hebbian = + regrow where pre/post activity correlates; auto = hebbian for g2g, none otherwise",
          choices=("auto", "none", *PRESETS))
    _flag(s, "--prune", "override the preset's prune criterion", choices=PRUNE)
    _flag(s, "--regrow", "override the preset's regrow criterion", choices=REGROW)
    _flag(s, "--dst-interval", "optimizer steps between mask updates", type=_positive(int))
    _flag(s, "--dst-fraction", "fraction of live edges moved per update, at first", type=float)
    _flag(s, "--dst-end", "fraction of training after which the masks freeze", type=float)
    _flag(s, "--dst-schedule", "cosine: fraction decays to 0 at --dst-end; constant: the same fraction every update",
          choices=SCHEDULES)
    _flag(s, "--dst-fade", "steps over which pruned weights shrink to zero before they leave the mask (0: at once; "
                           "below --dst-interval)", type=int)
    _flag(s, "--dst-keep-groups", "prune only connections across groups (the fraction is of those): each group's own "
                                  "wiring stays", action=argparse.BooleanOptionalAction)
    t = p.add_argument_group("training")
    _flag(t, "--epochs", "training epochs (the cosine schedule spans them)", type=_positive(int))
    _flag(t, "--batch-size", "global training batch size (split across ranks under torchrun)", type=_positive(int))
    _flag(t, "--lr", "Adam learning rate (cosine-decayed to 0)", type=_positive(float))
    _flag(t, "--weight-decay", "Adam L2 weight decay (pruned weights stay 0)", type=float)
    _flag(t, "--seed", "seeds weights, masks, shuffling and augmentation", type=int)
    r = p.add_argument_group("run (free to change on --resume)")
    _flag(r, "--device", "auto: CUDA when available (under torchrun: GPU LOCAL_RANK)", choices=("auto", "cpu", "cuda"))
    _flag(r, "--threads", "torch intra-op threads (default: 1 on CUDA, else torch's)", type=_positive(int))
    _flag(r, "--out", "output directory (default runs/DATASET-MODEL)", type=Path)
    _flag(r, "--resume", "continue the run saved in --out from its last finished epoch", action="store_true")
    _flag(r, "--stop-after", "stop after N epochs in this invocation (continue later with --resume)",
          type=_positive(int), metavar="N")
    _flag(r, "--no-progress", "no progress bars", dest="progress", action="store_false")
    return p


def config_from_flags(flags: dict) -> TrainConfig:
    """The run the typed flags ask for; with --resume, the saved run's settings, refusing typed ones that differ."""
    if not flags.get("resume"):
        return TrainConfig(**flags)
    run = set(TrainConfig.run_fields())
    how = {k: v for k, v in flags.items() if k not in run}
    how.setdefault("out", TrainConfig.default_out(flags.get("dataset", _DEFAULTS["dataset"]),
                                                  flags.get("model", _DEFAULTS["model"])))
    saved = saved_config(how["out"])
    conflicts = [f"--{k.replace('_', '-')} {v} (saved run: {saved.get(k)})" for k, v in flags.items()
                 if k in run and (list(v) if isinstance(v, tuple) else v) != saved.get(k)]
    if conflicts:
        raise ConfigError("--resume: flags differ from the saved run: " + "; ".join(conflicts))
    return TrainConfig(**how).with_saved(saved)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    flags = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    try:
        cfg = config_from_flags(flags)
        train(cfg)
    except ConfigError as e:
        parser.error(str(e))
    except (DataError, TrainError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
