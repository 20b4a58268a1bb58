"""Connectivity masks for G2GNet's sparse layers.

A layer connects an input unit set to an output unit set, each split into ``G`` groups (ensembles).
Connections between matching groups are always on; connections across groups are on with
probability p', chosen so that the layer has a target density::

    density = 1/G + (1 - 1/G) * p'        (paper's intra/inter decomposition)

p' is realised as an exact *count* of inter-group edges chosen uniformly at random (sampling without
replacement rather than independent Bernoulli draws), so a given sparsity gives the same number of
edges for every seed and edge counts can be tested exactly.

Granularities:

* ``edge``: every inter-group connection is drawn on its own (as in the paper).
* ``block``: connections are decided per ``b x b`` tile of group-sorted units (a tile never mixes
  groups), and every output tile-row gets the same number of live tiles (±1 when the target does not
  divide evenly). That is the unit a block-sparse runtime executes as one batched matmul.

Groupings assign units to groups per unit set ``k`` (k = 0 is the encoder output):

* ``index``: contiguous (unit u is in group u // (n/G)).
* ``random``: a seeded random balanced assignment per hidden unit set.

Unit set 0, the encoder's patch-major features, is grouped by patch (contiguous) for every grouping:
any other order could not be folded into the conv, and a served graph would need a per-feature gather.
* ``mixer``: contiguous for even k, interleaved (u % G) for odd k, so consecutive layers shuffle
  ensembles like a channel shuffle.
"""
from __future__ import annotations

import torch

from g2gserve.model.config import GRANULARITIES, GROUPINGS  # noqa: F401  (re-exported)


def inter_group_probability(sparsity: float, groups: int) -> float:
    """p' for a target sparsity: solves ``1 - sparsity = 1/G + (1 - 1/G) p'``."""
    if groups == 1:
        return 1.0
    return ((1.0 - sparsity) - 1.0 / groups) / (1.0 - 1.0 / groups)


def group_assignment(n: int, groups: int, grouping: str, unit_set: int, generator: torch.Generator) -> torch.Tensor:
    """Group id (int64, shape [n]) of every unit of unit set number ``unit_set``."""
    if grouping not in GROUPINGS:
        raise ValueError(f"unknown grouping {grouping!r}; choose one of {', '.join(GROUPINGS)}")
    if n % groups:
        raise ValueError(f"{groups} groups do not divide a layer of {n} units")
    size = n // groups
    contiguous = torch.arange(n) // size
    if unit_set == 0 or grouping == "index" or (grouping == "mixer" and unit_set % 2 == 0):
        return contiguous  # unit set 0 (the encoder's patch features) is always grouped by patch
    if grouping == "mixer":
        return torch.arange(n) % groups
    perm = torch.randperm(n, generator=generator)
    out = torch.empty(n, dtype=torch.long)
    out[perm] = contiguous
    return out


def _fill(forced: torch.Tensor, total_on: int, balanced_rows: bool, generator: torch.Generator) -> torch.Tensor:
    """Turn on ``forced`` entries plus uniformly chosen free entries until exactly ``total_on`` are on.

    With ``balanced_rows`` the extra entries are spread so row counts differ by at most one.
    """
    rows, cols = forced.shape
    n_forced = int(forced.sum())
    extra = total_on - n_forced
    if extra < 0:
        raise ValueError(f"density too low: the intra-group connections alone are {n_forced} of {forced.numel()}")
    scores = torch.rand(rows, cols, generator=generator)
    scores[forced] = -1.0  # never chosen as extra
    if not balanced_rows:
        on = forced.clone().view(-1)
        if extra:
            on[torch.topk(scores.view(-1), extra).indices] = True
        return on.view(rows, cols)
    free_per_row = cols - forced.sum(1)
    base, rem = divmod(extra, rows)
    per_row = torch.full((rows,), base, dtype=torch.long)
    per_row[torch.randperm(rows, generator=generator)[:rem]] += 1
    if bool((per_row > free_per_row).any()):
        raise ValueError("density too high for a balanced block mask")
    ranks = scores.argsort(dim=1, descending=True).argsort(dim=1)
    return forced | (ranks < per_row[:, None])


def layer_mask(
    out_groups: torch.Tensor,
    in_groups: torch.Tensor,
    sparsity: float,
    granularity: str,
    block_size: int,
    generator: torch.Generator,
    structured: bool = True,
) -> torch.Tensor:
    """Bool mask [out, in] of one layer.

    ``structured=False`` gives the Erdős–Rényi baseline: no intra-group blocks, the same number of
    connections placed uniformly (per tile for ``block``).
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}")
    n_out, n_in = len(out_groups), len(in_groups)
    density = 1.0 - sparsity
    if granularity == "edge":
        forced = out_groups[:, None] == in_groups[None, :]
        if not structured:
            forced = torch.zeros_like(forced)
        return _fill(forced, round(density * n_out * n_in), False, generator)
    # Block: work in group-sorted coordinates so a tile never mixes groups, then map back.
    order_out, order_in = tile_order(out_groups), tile_order(in_groups)
    tile_out = out_groups[order_out][::block_size]
    tile_in = in_groups[order_in][::block_size]
    forced = tile_out[:, None] == tile_in[None, :]
    if not structured:
        forced = torch.zeros_like(forced)
    tiles = _fill(forced, round(density * forced.numel()), True, generator)
    return from_tile_mask(tiles, order_out, order_in, block_size)


def network_masks(
    widths: list[int],
    groups: int,
    grouping: str,
    sparsity: float,
    granularity: str,
    block_size: int,
    seed: int,
    structured: bool = True,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Masks for the layers ``widths[k] -> widths[k+1]`` and the group id of every unit set.

    Reproducible: the same arguments give the same masks on every machine.
    """
    gen = torch.Generator().manual_seed(seed)
    unit_groups = [group_assignment(n, groups, grouping, k, gen) for k, n in enumerate(widths)]
    masks = [
        layer_mask(unit_groups[k + 1], unit_groups[k], sparsity, granularity, block_size, gen, structured)
        for k in range(len(widths) - 1)
    ]
    return masks, unit_groups


def tile_order(groups: torch.Tensor) -> torch.Tensor:
    """Group-sorted order of a unit set: consecutive ``block_size`` units of it form one tile."""
    return torch.argsort(groups, stable=True)


def to_tiles(x: torch.Tensor, order_out: torch.Tensor, order_in: torch.Tensor, block_size: int) -> torch.Tensor:
    """View an [out, in] tensor as [out/b, in/b, b, b] tiles of group-sorted units (a copy)."""
    s = x[order_out][:, order_in]
    n_out, n_in = s.shape
    b = block_size
    return s.view(n_out // b, b, n_in // b, b).transpose(1, 2)


def from_tile_mask(tiles: torch.Tensor, order_out: torch.Tensor, order_in: torch.Tensor, block_size: int) -> torch.Tensor:
    """Inverse of ``to_tiles`` for a tile-level bool mask [out/b, in/b]: the unit-level mask [out, in]."""
    dense_sorted = tiles.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)
    mask = torch.empty_like(dense_sorted)
    mask[order_out[:, None], order_in[None, :]] = dense_sorted
    return mask
