"""G2GNet and its baselines, all built by one factory from a ``ModelConfig``.

Read top to bottom: patch encoder -> hidden (sparse) layers with ReLU -> dense classifier head.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from g2gserve.model.config import ModelConfig
from g2gserve.model.layers import PatchEncoder, SparseLinear
from g2gserve.model.masks import network_masks


class G2GNet(nn.Module):
    """``groups[k]``: group id of every unit of unit set k (encoder output first), as the masks were drawn;
    None for dense kinds. Stored in checkpoints (``model.checkpoint``) and used for packing and DST, so
    nothing re-derives it from the seed."""

    def __init__(self, cfg: ModelConfig, hidden: tuple[int, ...], masks: list[torch.Tensor | None],
                 groups: list[torch.Tensor] | None = None):
        super().__init__()
        self.cfg = cfg
        self.groups = groups
        widths = [cfg.encoder_features, *hidden]
        self.encoder = PatchEncoder(cfg.in_channels, cfg.conv_channels, cfg.patch_size)
        self.hidden = nn.ModuleList(SparseLinear(widths[k], widths[k + 1], masks[k]) for k in range(len(hidden)))
        self.head = nn.Linear(widths[-1], cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        for layer in self.hidden:
            h = F.relu(layer(h))
        return self.head(h)

    def sparse_layers(self) -> list[SparseLinear]:
        return [m for m in self.hidden if m.mask is not None]


def _network_masks(cfg: ModelConfig):
    return network_masks([cfg.encoder_features, *cfg.hidden], cfg.groups, cfg.grouping, cfg.sparsity,
                         cfg.granularity, cfg.block_size, cfg.mask_seed, structured=(cfg.kind == "g2g"))


def initial_masks_and_groups(cfg: ModelConfig) -> tuple[list[torch.Tensor | None], list[torch.Tensor] | None]:
    """The masks ``cfg.mask_seed`` draws for the hidden layers and the unit groups they were drawn with
    (Nones for dense kinds). Called when a model is first built; afterwards the groups travel with it."""
    if not cfg.is_sparse:
        return [None] * len(cfg.hidden), None
    return _network_masks(cfg)


def hidden_masks(cfg: ModelConfig) -> list[torch.Tensor | None]:
    """The initial masks of ``cfg``'s hidden layers (None for dense layers)."""
    return initial_masks_and_groups(cfg)[0]


def _conv_params(cfg: ModelConfig) -> int:
    return cfg.conv_channels * (cfg.in_channels * cfg.patch_size**2 + 1)


def _dense_param_count(cfg: ModelConfig, width: int) -> int:
    widths = [cfg.encoder_features] + [width] * len(cfg.hidden) + [cfg.num_classes]
    return _conv_params(cfg) + sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))


def matched_width(cfg: ModelConfig) -> int:
    """Width of a dense network (same depth) whose parameter count is closest to g2g's active count."""
    g2g = dataclasses.replace(cfg, kind="g2g")
    active_weights = sum(int(m.sum()) for m in hidden_masks(g2g))
    target = (_conv_params(cfg) + active_weights + sum(cfg.hidden)
              + cfg.hidden[-1] * cfg.num_classes + cfg.num_classes)
    return min(range(1, max(cfg.hidden) + 1), key=lambda w: abs(_dense_param_count(cfg, w) - target))


def model_widths(cfg: ModelConfig) -> tuple[int, ...]:
    """Hidden widths actually built (dense-params solves its own)."""
    if cfg.kind == "dense-params":
        return (matched_width(cfg),) * len(cfg.hidden)
    return cfg.hidden


def build_model(cfg: ModelConfig) -> G2GNet:
    """The one factory: every model kind from its config, reproducibly (masks from ``cfg.mask_seed``)."""
    return G2GNet(cfg, model_widths(cfg), *initial_masks_and_groups(cfg))
