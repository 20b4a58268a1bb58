"""Dynamic sparse training: every ``interval`` optimizer steps, prune a fraction of each sparse layer's
live connections and regrow exactly as many elsewhere, so every layer keeps its exact edge count.

Hooked on ``optimizer.step()`` (as RigL/SET libraries do): ``MaskScheduler(model, optimizer, ...)``
is all a training loop needs. Pruned and regrown weights are set to zero and their optimizer state
(Adam moments, momentum) is reset, so nothing comes back through stale momentum. For ``block``
masks whole tiles move, scores pooled per tile, one tile-row at a time, so rows stay balanced and the
model stays exactly block-sparse for the exporter. Regrowth never picks an edge pruned in the same
update (so every update really moves ``moved`` edges).

``fade`` > 0 prunes gently: the pruned connections stay in the mask for ``fade`` more steps while their weights
shrink linearly to zero (the rest of the network learns to do without them), and only then leave the mask and
the optimizer state; regrown ones join at once. Why it exists: a block tile is a whole slab of a row's inputs
(at 87.5% sparsity with 64-wide tiles, half of them), and block DST lost 7 points there on CIFAR-10; the fade
tested whether cutting at once was the cause, and it was not (docs/regimes-875.md): off by default. While a fade
runs a layer holds its edge count plus the pruned ones.

``keep_groups`` prunes only connections between non-matching groups (the fraction is of those), so each group's
own wiring stays and DST rewires only the rare edges across: block DST otherwise trades a group's own tiles for
another group's (docs/training.md).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from g2gserve.model.masks import from_tile_mask, tile_order, to_tiles
from g2gserve.model.g2gnet import G2GNet, hidden_masks

from .distributed import SINGLE, World
from .hebbian import HebbianTracker
from .loop import run_generator

PRUNE = ("magnitude", "random", "hebbian", "mixed")
REGROW = ("random", "gradient", "hebbian")
PRESETS = {"set": ("magnitude", "random"), "rigl": ("magnitude", "gradient"), "hebbian": ("magnitude", "hebbian")}
SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class DSTConfig:
    prune: str = "magnitude"
    regrow: str = "hebbian"
    interval: int = 200  # optimizer steps between updates (Delta T)
    fraction: float = 0.3  # fraction of live edges moved per update (decayed by ``schedule``)
    end: float = 0.75  # no updates after this fraction of training
    schedule: str = "cosine"
    window: int = 20  # batches before each update whose activity the Hebbian score sees
    fade: int = 0  # steps over which pruned weights shrink to zero before leaving the mask (0: at once)
    keep_groups: bool = False  # prune only connections across groups: each group's own wiring stays

    def __post_init__(self) -> None:
        if self.prune not in PRUNE:
            raise ValueError(f"unknown prune criterion {self.prune!r}; choose one of {', '.join(PRUNE)}")
        if self.regrow not in REGROW:
            raise ValueError(f"unknown regrow criterion {self.regrow!r}; choose one of {', '.join(REGROW)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown DST schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.interval < 1 or self.window < 1:
            raise ValueError("--dst-interval and the Hebbian window must be at least 1")
        if not 0.0 < self.fraction < 1.0:
            raise ValueError(f"--dst-fraction must be in (0, 1), got {self.fraction}")
        if not 0 <= self.fade < self.interval:
            raise ValueError(f"--dst-fade must be in [0, --dst-interval), got {self.fade}")
        if not 0.0 < self.end <= 1.0:
            raise ValueError(f"--dst-end must be in (0, 1], got {self.end}")

    @property
    def uses_hebbian(self) -> bool:
        return "hebbian" in (self.prune, self.regrow) or self.prune == "mixed"

    def to_dict(self) -> dict:
        return asdict(self)


def _select(scores: torch.Tensor, candidates: torch.Tensor, counts: torch.Tensor | int, largest: bool) -> torch.Tensor:
    """Bool mask of the ``counts`` best candidates: globally (int) or per row (tensor of row counts)."""
    fill = -math.inf if largest else math.inf
    s = scores.masked_fill(~candidates, fill)
    out = torch.zeros_like(candidates)
    if isinstance(counts, int):
        n = min(counts, int(candidates.sum()))
        if n:
            out.view(-1)[torch.topk(s.reshape(-1), n, largest=largest).indices] = True
        return out
    counts = torch.minimum(counts, candidates.sum(1))
    ranks = s.argsort(dim=1, descending=largest).argsort(dim=1)
    return (ranks < counts[:, None]) & candidates


class MaskScheduler:
    """Prune-and-regrow updates for the sparse layers of a G2GNet, driven by optimizer steps."""

    def __init__(self, model: G2GNet, optimizer: torch.optim.Optimizer, cfg: DSTConfig, total_steps: int, seed: int = 0,
                 world: World = SINGLE):
        self.model, self.optimizer, self.cfg, self.world = model, optimizer, cfg, world
        self.total_steps, self.seed = total_steps, seed
        self.layers = model.sparse_layers()
        if not self.layers:
            raise ValueError("dynamic sparse training needs a sparse model (g2g or er)")
        mc = model.cfg
        self.block = mc.block_size if mc.granularity == "block" else None
        groups = [g.cpu() for g in model.groups]  # stored with the model, never redrawn
        self.orders = [tile_order(g) for g in groups]
        device = self.layers[0].weight.device
        self.intra = [(groups[k + 1][:, None] == groups[k][None, :]).to(device) for k in range(len(self.layers))]
        self.initial = [m.to(device) for m in hidden_masks(mc)]
        self.step = 0
        self.records: list[dict] = []
        self.tracker = HebbianTracker(self.layers) if cfg.uses_hebbian else None
        self._grads: list[torch.Tensor | None] = [None] * len(self.layers)
        self._fading: list[torch.Tensor] | None = None  # per layer: the pruned weights still fading out
        self._fade_left = 0  # steps until they leave the mask
        self._want_grad = False
        self._hooks = [optimizer.register_step_post_hook(lambda opt, a, kw: self._after_step())]
        if cfg.regrow == "gradient":
            self._hooks += [l.register_forward_hook(self._grad_hook(k)) for k, l in enumerate(self.layers)]

    # ------------------------------------------------------------ schedule
    @property
    def end_step(self) -> int:
        return int(self.cfg.end * self.total_steps)

    def fraction_at(self, step: int) -> float:
        if step > self.end_step:
            return 0.0
        if self.cfg.schedule == "constant":
            return self.cfg.fraction
        return 0.5 * self.cfg.fraction * (1.0 + math.cos(math.pi * step / max(1, self.end_step)))

    def _is_update(self, step: int) -> bool:
        return step > 0 and step % self.cfg.interval == 0 and step <= self.end_step

    def _after_step(self) -> None:
        self.step += 1
        if self._fade_left:
            self._fade()
        if self._is_update(self.step):
            self.update()
        nxt = self.step + 1  # arm the hooks for the coming forward pass
        in_window = any(self._is_update(s) for s in range(nxt, nxt + self.cfg.window))
        if self.tracker is not None:
            self.tracker.active = in_window
        self._want_grad = self._is_update(nxt)

    def _grad_hook(self, k: int):
        """Dense gradient dL/d(W*M) of the batch before an update (RigL), from input and output grad."""
        def hook(module, inputs, output):
            if not (self._want_grad and module.training and output.requires_grad):
                return
            x = inputs[0].detach().flatten(0, -2)

            def on_grad(g):
                self._grads[k] = g.detach().flatten(0, -2).t() @ x
            output.register_hook(on_grad)
        return hook

    # ------------------------------------------------------------ the update
    def _scores(self, k: int, criterion: str, gen: torch.Generator) -> torch.Tensor:
        layer = self.layers[k]
        if criterion == "magnitude":
            return layer.weight.detach().abs()
        if criterion == "random":
            return torch.rand(layer.weight.shape, generator=gen).to(layer.weight.device)
        if criterion == "hebbian":
            return self.tracker.score(k)
        if criterion == "gradient":
            if self._grads[k] is None:
                raise RuntimeError("gradient regrowth needs the dense gradient of the last batch")
            return self._grads[k].abs()
        raise ValueError(criterion)

    def _pool(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """Per-tile sums for block masks; identity for edge masks."""
        if self.block is None:
            return x
        return to_tiles(x.float(), self.orders[k + 1], self.orders[k], self.block).sum((2, 3))

    def _share_scores(self) -> None:
        """Under torchrun: sum each rank's Hebbian statistics and average its RigL gradients, so every
        rank scores with the whole global batch and takes the same decision as a single process would."""
        if self.world.size == 1:
            return
        if self.tracker is not None:
            self.tracker.sum_over(self.world)
        grads = [g for g in self._grads if g is not None]
        self.world.sum_(*grads)
        for g in grads:
            g.div_(self.world.size)

    @torch.no_grad()
    def update(self) -> None:
        self._share_scores()
        frac = self.fraction_at(self.step)
        gen = run_generator(self.seed, self.step)
        fade = self.cfg.fade if self.step + self.cfg.fade <= self.total_steps else 0  # a fade always ends in training
        fading: list[torch.Tensor] = []
        for k, layer in enumerate(self.layers):
            live = self._pool(k, layer.mask) > 0
            movable = live & ~(self._pool(k, self.intra[k]) > 0) if self.cfg.keep_groups else live
            # Never prune more than can be regrown elsewhere: the edge count must stay exact.
            if self.block is None:
                count: torch.Tensor | int = min(round(frac * int(movable.sum())), int((~live).sum()))
            else:  # spread round(frac * movable tiles) over tile-rows, differing by at most one
                rows = live.shape[0]
                base, rem = divmod(round(frac * int(movable.sum())), rows)
                count = torch.full((rows,), base, dtype=torch.long, device=live.device)
                count[torch.randperm(rows, generator=gen)[:rem].to(live.device)] += 1
                count = torch.minimum(count, (~live).sum(1))
            criteria = ["magnitude", "hebbian", "random"] if self.cfg.prune == "mixed" else [self.cfg.prune]
            counts = [count // 3, count // 3, count - 2 * (count // 3)] if len(criteria) == 3 else [count]
            pruned = torch.zeros_like(live)
            for criterion, n in zip(criteria, counts):
                scores = self._pool(k, self._scores(k, criterion, gen))
                pruned |= _select(scores, movable & ~pruned, n, largest=False)
            moved = int(pruned.sum()) if self.block is None else pruned.sum(1)
            regrow_scores = self._pool(k, self._scores(k, self.cfg.regrow, gen))
            grown = _select(regrow_scores, ~live & ~pruned, moved, largest=True)
            new_live = (live & ~pruned) | grown
            if self.block is None:
                new_mask = new_live
            else:
                new_mask = from_tile_mask(new_live, self.orders[k + 1], self.orders[k], self.block)
            if not self.world.same_everywhere(new_mask):
                raise RuntimeError(f"DST step {self.step}: hidden.{k}'s new mask differs between ranks")
            changed = new_mask ^ layer.mask
            cut = changed & layer.mask  # the pruned weights
            if fade:  # they stay, shrinking, until _fade removes them; the regrown ones start now
                fading.append(cut)
                changed &= ~cut
                new_mask = new_mask | cut
            layer.mask.copy_(new_mask)
            self._clear(layer, changed)  # pruned (unless fading): gone; regrown: start at zero
            kept = new_mask & ~cut  # the mask once any fade is over
            active = int(kept.sum())
            self.records.append({
                "step": self.step, "layer": k, "fraction": frac, "moved": int(cut.sum()),
                "active": active, "intra_fraction": int((kept & self.intra[k]).sum()) / active,
                "turnover": int((kept & ~self.initial[k]).sum()) / active,
            })
        if fade:
            self._fading, self._fade_left = fading, fade
        if self.tracker is not None:
            self.tracker.reset()
        self._grads = [None] * len(self.layers)

    def _clear(self, layer: torch.nn.Module, where: torch.Tensor) -> None:
        """Zero the weights and their optimizer state (Adam moments, momentum) at ``where``."""
        layer.weight[where] = 0.0
        for value in self.optimizer.state.get(layer.weight, {}).values():
            if torch.is_tensor(value) and value.shape == layer.weight.shape:
                value[where] = 0.0

    @torch.no_grad()
    def _fade(self) -> None:
        """One step of the fade: the fading weights shrink to (left - 1) / left of their value, so they reach
        zero linearly over ``fade`` steps (whatever the optimizer adds meanwhile shrinks with them); at zero they
        leave the mask."""
        left = self._fade_left
        for layer, cut in zip(self.layers, self._fading):
            if left > 1:
                layer.weight[cut] *= (left - 1) / left
            else:
                self._clear(layer, cut)
                layer.mask[cut] = False
        self._fade_left -= 1
        if not self._fade_left:
            self._fading = None

    # ------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        return {"step": self.step, "records": self.records, "config": self.cfg.to_dict(),
                "tracker": None if self.tracker is None else self.tracker.state_dict(self.world),
                "fading": None if self._fading is None else [c.cpu() for c in self._fading],
                "fade_left": self._fade_left}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.records = int(state["step"]), list(state["records"])
        fading = state.get("fading")
        self._fading = None if fading is None else [c.to(l.mask.device) for c, l in zip(fading, self.layers)]
        self._fade_left = int(state.get("fade_left", 0))
        if self.tracker is not None and state.get("tracker") is not None:
            self.tracker.load_state_dict(state["tracker"], self.world)
        self._want_grad = self._is_update(self.step + 1)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        if self.tracker is not None:
            self.tracker.remove()
