"""``model.pt``: everything needed to rebuild, evaluate and export a trained model, without pickle.

A checkpoint is a plain dict of tensors, strings and numbers loaded with
``torch.load(weights_only=True)``, so opening an untrusted file cannot run code.
"""
from __future__ import annotations

import pickle
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch

from g2gserve import __version__
from g2gserve.model.config import ModelConfig
from g2gserve.fileio import atomic_write
from g2gserve.model.g2gnet import G2GNet, build_model
from g2gserve.data.preprocess import Preprocess

FORMAT = "g2gserve.checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A file is missing, corrupt, or not a g2gserve checkpoint; the message names the file."""


def versions() -> dict[str, str]:
    return {"g2gserve": __version__, "torch": str(torch.__version__), "python": platform.python_version()}


@dataclass
class Checkpoint:
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    classes: list[str]
    preprocess: Preprocess
    history: list[dict] = field(default_factory=list)
    seed: int = 0
    meta: dict = field(default_factory=dict)  # dataset, training args, versions, ...

    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(), "state_dict": self.state_dict, "classes": list(self.classes),
            "preprocess": self.preprocess.to_dict(), "history": self.history, "seed": self.seed,
            "meta": self.meta | {"versions": versions()},
        }

    def build(self) -> G2GNet:
        """The model with trained weights and (possibly rewired) masks."""
        model = build_model(self.config)
        _load_weights(model, self.state_dict)
        model.eval()
        return model


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
    return Checkpoint(model.cfg, state, list(classes), preprocess, list(history or []), seed, dict(meta or {}))


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
            seed=int(obj.get("seed", 0)), meta=dict(obj.get("meta", {})),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: damaged checkpoint ({type(e).__name__}: {e})") from e
    if len(ckpt.classes) != ckpt.config.num_classes:
        raise CheckpointError(f"{path}: {len(ckpt.classes)} class names for {ckpt.config.num_classes} classes")
    return ckpt


def load_model(path: str | Path) -> tuple[G2GNet, Checkpoint]:
    ckpt = load_checkpoint(path)
    try:
        return ckpt.build(), ckpt
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e
