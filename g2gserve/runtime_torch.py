"""PyTorch execution of a ``PackedNet``: block-sparse and CSR layers run as stored, never re-densified."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .formats import PackedLayer, PackedNet


class DenseLayer(nn.Module):
    def __init__(self, layer: PackedLayer):
        super().__init__()
        self.register_buffer("weight", layer.tensors["weight"].clone())
        self.register_buffer("bias", layer.tensors["bias"].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class BlockSparseLayer(nn.Module):
    """Gather the live input tiles of every output tile-row, then one batched matmul over tile-rows."""

    def __init__(self, layer: PackedLayer):
        super().__init__()
        blocks, idx = layer.tensors["blocks"], layer.tensors["idx"]
        self.b = layer.block_size
        self.n_out_tiles, self.k = idx.shape
        self.n_in_tiles = layer.in_features // self.b
        self.out_features = layer.out_features
        self.register_buffer("blocks", blocks.clone())  # [O, K*b, b]
        self.register_buffer("idx", idx.reshape(-1).clone())  # [O*K]
        self.register_buffer("bias", layer.tensors["bias"].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        tiles = x.reshape(n, self.n_in_tiles, self.b).index_select(1, self.idx)  # [N, O*K, b]
        tiles = tiles.view(n, self.n_out_tiles, self.k * self.b).transpose(0, 1)  # [O, N, K*b]
        y = torch.bmm(tiles, self.blocks)  # [O, N, b]
        return y.transpose(0, 1).reshape(n, self.out_features) + self.bias


class CSRLayer(nn.Module):
    def __init__(self, layer: PackedLayer):
        super().__init__()
        t = layer.tensors
        self.shape = (layer.out_features, layer.in_features)
        for name in ("crow", "col", "values", "bias"):
            self.register_buffer(name, t[name].clone())
        self._csr: torch.Tensor | None = None

    def weight(self) -> torch.Tensor:
        if self._csr is None or self._csr.device != self.values.device:
            # indices were range-checked when the export was loaded (runtime.validate_packed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "CSR support is in beta"
                self._csr = torch.sparse_csr_tensor(self.crow, self.col, self.values, self.shape,
                                                    check_invariants=False)
        return self._csr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # sparse.mm(W, x^T)^T is 3-15x faster than F.linear with a CSR weight (shared notes)
        return torch.sparse.mm(self.weight(), x.t()).t() + self.bias


LAYERS = {"dense": DenseLayer, "block": BlockSparseLayer, "csr": CSRLayer}


class PackedModule(nn.Module):
    """The inference network of a ``PackedNet``: normalised images in, logits out."""

    def __init__(self, packed: PackedNet):
        super().__init__()
        p = packed.patch_size
        self.conv = nn.Conv2d(packed.in_channels, packed.conv_weight.shape[0], kernel_size=p, stride=p)
        with torch.no_grad():
            self.conv.weight.copy_(packed.conv_weight)
            self.conv.bias.copy_(packed.conv_bias)
        self.hidden = nn.ModuleList(LAYERS[l.format](l) for l in packed.layers)
        self.head = nn.Linear(packed.head_weight.shape[1], packed.num_classes)
        with torch.no_grad():
            self.head.weight.copy_(packed.head_weight)
            self.head.bias.copy_(packed.head_bias)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(x)).permute(0, 2, 3, 1).flatten(1)
        for layer in self.hidden:
            h = F.relu(layer(h))
        return self.head(h)
