"""``model.pt``: everything needed to rebuild, evaluate and export a trained model, without pickle.

A checkpoint is a plain dict of tensors, strings and numbers loaded with
``torch.load(weights_only=True)``, so opening an untrusted file cannot run code.
"""
from __future__ import annotations

import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from g2gserve.errors import CheckpointError  # noqa: F401  (re-exported)
from g2gserve.model.config import ModelConfig
from g2gserve.fileio import atomic_write
from g2gserve.model.g2gnet import G2GNet, initial_masks_and_groups, model_widths
from g2gserve.data.preprocess import Preprocess
from g2gserve.versions import versions

FORMAT = "g2gserve.checkpoint"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    classes: list[str]
    preprocess: Preprocess
    history: list[dict] = field(default_factory=list)
    seed: int = 0
    meta: dict = field(default_factory=dict)  # dataset, training args, versions, ...
    groups: list[torch.Tensor] | None = None  # ``G2GNet.groups``: unit groups per unit set (None: dense kinds)

    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(), "state_dict": self.state_dict, "classes": list(self.classes),
            "preprocess": self.preprocess.to_dict(), "history": self.history, "seed": self.seed,
            "meta": self.meta | {"versions": versions("torch")}, "groups": self.groups,
        }

    def build(self) -> G2GNet:
        """The model with trained weights, its stored (possibly rewired) masks and stored groups: nothing is
        redrawn from the seed."""
        n = len(self.config.hidden)
        masks = [self.state_dict.get(f"hidden.{k}.mask") for k in range(n)]
        try:
            model = G2GNet(self.config, model_widths(self.config), masks, self.groups)
        except ValueError as e:
            raise CheckpointError(f"masks do not match the config ({e})") from e
        _load_weights(model, self.state_dict)
        model.eval()
        return model


def check_groups(cfg: ModelConfig, groups) -> None:
    """Raise ValueError unless ``groups`` fits ``cfg``: one balanced int64 assignment per unit set (None if dense)."""
    if not cfg.is_sparse:
        if groups is not None:
            raise ValueError(f"a {cfg.kind} model has no unit groups")
        return
    widths = [cfg.encoder_features, *cfg.hidden]
    if not isinstance(groups, list) or len(groups) != len(widths):
        raise ValueError(f"unit groups must be a list of {len(widths)} tensors (encoder output, then each hidden layer)")
    for k, (g, n) in enumerate(zip(groups, widths)):
        if not isinstance(g, torch.Tensor) or g.dtype != torch.int64 or tuple(g.shape) != (n,):
            raise ValueError(f"unit groups of unit set {k} must be int64 of shape ({n},)")
        if bool((g < 0).any() | (g >= cfg.groups).any()) or \
                not bool((torch.bincount(g, minlength=cfg.groups) == n // cfg.groups).all()):
            raise ValueError(f"unit groups of unit set {k} are not {cfg.groups} groups of {n // cfg.groups} units")


def _load_weights(model: G2GNet, state: dict[str, torch.Tensor]) -> None:
    # Masks are buffers that may be None at build time only for dense layers, so shapes must match.
    ours = model.state_dict()
    if set(ours) != set(state):
        missing, extra = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
        raise CheckpointError(f"weights do not match the config (missing {missing}, unexpected {extra})")
    for k, v in state.items():
        if tuple(v.shape) != tuple(ours[k].shape):
            raise CheckpointError(f"weight {k} has shape {tuple(v.shape)}, config expects {tuple(ours[k].shape)}")
    model.load_state_dict(state)


def from_model(model: G2GNet, classes: list[str], preprocess: Preprocess, history: list[dict] | None = None,
               seed: int = 0, meta: dict | None = None) -> Checkpoint:
    state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    groups = None if model.groups is None else [g.detach().to("cpu").clone() for g in model.groups]
    return Checkpoint(model.cfg, state, list(classes), preprocess, list(history or []), seed, dict(meta or {}), groups)


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> None:
    """Atomically write ``ckpt``: a crash mid-write leaves the previous file intact."""
    atomic_write(path, lambda tmp: torch.save(ckpt.to_dict(), tmp))


def safe_torch_load(path: str | Path, what: str = "checkpoint") -> dict:
    """``torch.load(weights_only=True)`` with errors that name the file and say what is wrong."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's text suggests weights_only=False and is cut off here: say why not
        found = next((l.strip() for l in str(e).splitlines() if "WeightsUnpickler error" in l), "")
        raise CheckpointError(f"{path}: not a readable g2gserve {what}: it holds Python objects beyond tensors and "
                              f"plain data ({found.split('. ')[0] or 'an object the safe loader does not allow'}); "
                              f"loading those would run code from the file, so g2gserve never does") from e
    except Exception as e:  # zipfile/EOF/RuntimeError: all mean "not a checkpoint we can trust"
        raise CheckpointError(f"{path}: not a readable g2gserve {what} ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a g2gserve {what} (holds a {type(obj).__name__})")
    return obj


def load_checkpoint(path: str | Path) -> Checkpoint:
    obj = safe_torch_load(path)
    if obj.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a g2gserve checkpoint (format {obj.get('format')!r}, expected {FORMAT!r})")
    if obj.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {obj.get('format_version')} is not supported "
                              f"(this g2gserve reads version {FORMAT_VERSION})")
    try:
        ckpt = Checkpoint(
            config=ModelConfig.from_dict(obj["config"]), state_dict=obj["state_dict"], classes=list(obj["classes"]),
            preprocess=Preprocess.from_dict(obj["preprocess"]), history=list(obj.get("history", [])),
            seed=int(obj.get("seed", 0)), meta=dict(obj.get("meta", {})), groups=obj.get("groups"),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: damaged checkpoint ({type(e).__name__}: {e})") from e
    if "groups" not in obj and ckpt.config.is_sparse:
        warnings.warn(f"{path}: written before unit groups were stored; deriving them once from mask_seed "
                      f"{ckpt.config.mask_seed} (save the checkpoint again to store them)", stacklevel=2)
        ckpt.groups = initial_masks_and_groups(ckpt.config)[1]
    try:
        check_groups(ckpt.config, ckpt.groups)
    except ValueError as e:
        raise CheckpointError(f"{path}: damaged checkpoint ({e})") from e
    if len(ckpt.classes) != ckpt.config.num_classes:
        raise CheckpointError(f"{path}: {len(ckpt.classes)} class names for {ckpt.config.num_classes} classes")
    return ckpt


def load_model(path: str | Path) -> tuple[G2GNet, Checkpoint]:
    ckpt = load_checkpoint(path)
    try:
        return ckpt.build(), ckpt
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e
