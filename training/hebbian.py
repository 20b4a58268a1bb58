"""Hebbian co-activity of every (post, pre) pair of a sparse layer, for rewiring.

G2GNet's Hebbian rewiring rule (arXiv 2508.14140) regrows connections between units that fire
together. We score a pair by the cosine similarity of their activity over recent training batches,
kept as exponential moving averages (decay ``beta``) of three sums, per layer::

    S_ij <- beta S_ij + (1 - beta) sum_b post_bi pre_bj      (one matmul: post^T @ pre)
    P_i  <- beta P_i  + (1 - beta) sum_b post_bi^2
    Q_j  <- beta Q_j  + (1 - beta) sum_b pre_bj^2
    score_ij = S_ij / sqrt(P_i Q_j + eps)

``pre`` is the layer's input, ``post`` its output after ReLU (both non-negative, so 0 <= score <= 1).
State is one out x in matrix and two vectors per layer, on the training device; hooks run only when
``active`` is set (the scheduler turns them on for a window of batches before each update).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-12


class HebbianTracker:
    def __init__(self, layers, beta: float = 0.9):
        self.layers = list(layers)
        self.beta = beta
        self.active = False
        self.corr = [torch.zeros_like(l.weight, requires_grad=False) for l in self.layers]
        self.post_sq = [torch.zeros(l.out_features, device=l.weight.device) for l in self.layers]
        self.pre_sq = [torch.zeros(l.in_features, device=l.weight.device) for l in self.layers]
        self.batches = 0
        self._handles = [l.register_forward_hook(self._hook(k)) for k, l in enumerate(self.layers)]

    def _hook(self, k: int):
        def hook(module, inputs, output):
            if not (self.active and module.training):
                return
            with torch.no_grad():
                pre = inputs[0].detach().flatten(0, -2)
                post = F.relu(output.detach()).flatten(0, -2)
                b, one = self.beta, 1.0 - self.beta
                self.corr[k].mul_(b).addmm_(post.t(), pre, alpha=one)
                self.post_sq[k].mul_(b).add_(post.square().sum(0), alpha=one)
                self.pre_sq[k].mul_(b).add_(pre.square().sum(0), alpha=one)
                if k == 0:
                    self.batches += 1
        return hook

    def score(self, k: int) -> torch.Tensor:
        """Cosine similarity [out, in] of post unit i and pre unit j over the recent batches."""
        return self.corr[k] / torch.sqrt(torch.outer(self.post_sq[k], self.pre_sq[k]) + EPS)

    def reset(self) -> None:
        for t in (*self.corr, *self.post_sq, *self.pre_sq):
            t.zero_()
        self.batches = 0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def _stats(self) -> list[torch.Tensor]:
        return [*self.corr, *self.post_sq, *self.pre_sq]

    def sum_over(self, world) -> None:
        """Sum the statistics over torchrun's ranks (each saw its shard): they then hold the global
        batch's EMAs, since every update is linear in the batch sums."""
        world.sum_(*self._stats())

    def state_dict(self, world=None) -> dict:
        """The global statistics (summed over ranks when ``world`` has several; every rank must call)."""
        stats = [t.clone() for t in self._stats()]
        if world is not None:
            world.sum_(*stats)
        n = len(self.layers)
        return {"corr": stats[:n], "post_sq": stats[n:2 * n], "pre_sq": stats[2 * n:], "batches": self.batches,
                "active": self.active}

    def load_state_dict(self, state: dict, world=None) -> None:
        """Load global statistics; under torchrun only rank 0 keeps them (the others start from zero),
        so the sum over ranks at the next update is right again."""
        keep = world is None or world.rank == 0
        for name in ("corr", "post_sq", "pre_sq"):
            for dst, src in zip(getattr(self, name), state[name]):
                dst.copy_(src) if keep else dst.zero_()
        self.batches, self.active = int(state["batches"]), bool(state["active"])
