"""Building blocks shared by every model kind."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchEncoder(nn.Module):
    """One conv with kernel = stride = patch size: the same small filter bank applied to every patch.

    Output is patch-major (all channels of patch 0, then patch 1, ...), so contiguous groups of
    features are groups of patches.
    """

    def __init__(self, in_channels: int, channels: int, patch_size: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x)).permute(0, 2, 3, 1).flatten(1)


class SparseLinear(nn.Module):
    """A linear layer with a 0/1 connectivity mask (``mask=None``: dense).

    Invariant: masked weights are exactly zero. They are zeroed at init and on every load, and their
    gradient is zeroed in place as soon as it is accumulated, so Adam/SGD (with weight decay, whose
    term is proportional to the zero weight) never move them. That is why the forward is a plain
    ``F.linear``: masking the weight every step would cost ~10% of a training step; masking the
    gradient costs one in-place multiply. Init is He-uniform scaled by each output unit's *active*
    fan-in, so a sparse unit starts with the same activation scale as a dense one.
    """

    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features))
        if mask is not None and tuple(mask.shape) != (out_features, in_features):
            raise ValueError(f"mask shape {tuple(mask.shape)} != ({out_features}, {in_features})")
        self.register_buffer("mask", None if mask is None else mask.to(torch.bool))
        if mask is not None:
            self.weight.register_post_accumulate_grad_hook(self._mask_grad)
            self.register_load_state_dict_post_hook(lambda module, keys: module.apply_mask_())
        self.reset_parameters()

    def _mask_grad(self, weight: torch.Tensor) -> None:
        weight.grad.mul_(self._float_mask())

    def _float_mask(self) -> torch.Tensor:
        """The mask as floats (multiplying by a bool tensor is ~10x slower), rebuilt when it changes."""
        key = (id(self.mask), self.mask._version, self.weight.dtype)
        if getattr(self, "_mask_key", None) != key:
            self._mask_f, self._mask_key = self.mask.to(self.weight.dtype), key
        return self._mask_f

    def fan_in(self) -> torch.Tensor:
        if self.mask is None:
            return torch.full((self.out_features,), float(self.in_features))
        return self.mask.sum(1).clamp(min=1).float()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        fan_in = self.fan_in().to(self.weight.device)
        self.weight.uniform_(-1.0, 1.0).mul_(torch.sqrt(6.0 / fan_in)[:, None])
        self.bias.uniform_(-1.0, 1.0).div_(torch.sqrt(fan_in))
        self.apply_mask_()

    @torch.no_grad()
    def apply_mask_(self) -> None:
        if self.mask is not None:
            self.weight.mul_(self.mask)

    def masked_weight(self) -> torch.Tensor:
        return self.weight if self.mask is None else self.weight * self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)  # masked weights are zero (see class docstring)

    def extra_repr(self) -> str:
        density = 1.0 if self.mask is None else float(self.mask.float().mean())
        return f"in_features={self.in_features}, out_features={self.out_features}, density={density:.4f}"

