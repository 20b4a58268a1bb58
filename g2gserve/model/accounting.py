"""Parameter and compute accounting: what a sparse model really stores and computes per image."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from g2gserve.model.g2gnet import G2GNet


@dataclass
class LayerStats:
    name: str
    shape: tuple[int, ...]
    params: int  # weights + bias as stored densely
    active: int  # weights that can be non-zero + bias
    macs_dense: int  # multiply-accumulates per image, dense computation
    macs_sparse: int  # multiply-accumulates per image, only live connections

    @property
    def density(self) -> float:
        """Fraction of weights (biases excluded) that are live."""
        return self.macs_sparse / self.macs_dense


def layer_stats(model: G2GNet) -> list[LayerStats]:
    cfg = model.cfg
    conv = model.encoder.conv
    n_conv = conv.weight.numel() + conv.bias.numel()
    conv_macs = conv.weight.numel() * cfg.patch_grid**2
    stats = [LayerStats("encoder", tuple(conv.weight.shape), n_conv, n_conv, conv_macs, conv_macs)]
    for k, layer in enumerate(model.hidden):
        dense = layer.weight.numel()
        live = dense if layer.mask is None else int(layer.mask.sum())
        stats.append(LayerStats(f"hidden.{k}", tuple(layer.weight.shape), dense + layer.out_features,
                                live + layer.out_features, dense, live))
    head = model.head
    n_head = head.weight.numel() + head.bias.numel()
    stats.append(LayerStats("head", tuple(head.weight.shape), n_head, n_head, head.weight.numel(), head.weight.numel()))
    return stats


def model_summary(model: G2GNet) -> dict:
    """Totals and per-layer numbers, JSON-ready."""
    stats = layer_stats(model)
    return {
        "params": sum(s.params for s in stats),
        "active_params": sum(s.active for s in stats),
        "macs_dense": sum(s.macs_dense for s in stats),
        "macs_sparse": sum(s.macs_sparse for s in stats),
        "layers": [asdict(s) | {"density": s.density} for s in stats],
    }
