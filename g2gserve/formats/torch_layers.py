"""The torch modules of the packed formats (imported only by the torch runtime: this module imports torch).

Each computes ``x @ W.T + bias`` from its format's stored tensors (layouts: ``formats.block``,
``formats.csr``, ``formats.dense``) without re-densifying.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from g2gserve.formats.base import PackedLayer


def _tensor(a) -> torch.Tensor:
    return torch.from_numpy(a.copy())  # a copy: the module owns its buffers (bundle arrays may be read-only)


class DenseLayer(nn.Module):
    def __init__(self, layer: PackedLayer):
        super().__init__()
        self.register_buffer("weight", _tensor(layer.tensors["weight"]))
        self.register_buffer("bias", _tensor(layer.tensors["bias"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def tile_major(x: torch.Tensor, b: int) -> torch.Tensor:
    """(N, features) -> tile-major (features / b, N, b) view."""
    return x.view(x.shape[0], -1, b).transpose(0, 1)


def from_tile_major(h: torch.Tensor) -> torch.Tensor:
    """Tile-major (tiles, N, b) -> (N, tiles * b)."""
    return h.transpose(0, 1).reshape(h.shape[1], -1)


class BlockSparseLayer(nn.Module):
    """Gather the live input tiles of every output tile-row, then one batched matmul over tile-rows.

    ``forward_tiles`` works on *tile-major* activations (n_tiles, N, b): the gather is then along the
    outermost axis and the output is already tile-major for the next block layer, so a chain of block
    layers needs no transposes (at batch 1 every reshape is free). ``forward`` takes the usual (N, features).
    """

    def __init__(self, layer: PackedLayer):
        super().__init__()
        idx = layer.tensors["idx"]
        self.b = layer.block_size
        self.n_out_tiles, self.k = idx.shape
        self.n_in_tiles = layer.in_features // self.b
        self.out_features = layer.out_features
        self.register_buffer("blocks", _tensor(layer.tensors["blocks"]))  # [O, K*b, b]
        self.register_buffer("idx", _tensor(idx.reshape(-1)))  # [O*K]
        self.register_buffer("bias", _tensor(layer.tensors["bias"]).view(self.n_out_tiles, 1, self.b))

    def forward_tiles(self, h: torch.Tensor) -> torch.Tensor:
        """(n_in_tiles, N, b) -> (n_out_tiles, N, b), without the activation."""
        n = h.shape[1]
        g = h.index_select(0, self.idx).view(self.n_out_tiles, self.k, n, self.b)
        g = g.transpose(1, 2).reshape(self.n_out_tiles, n, self.k * self.b)  # a view when n == 1
        return torch.baddbmm(self.bias, g, self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in) -> (N, out). For N > 1 this layout (gather along axis 1, batched matmul over a
        transposed view) moves less memory than tile-major activations."""
        n = x.shape[0]
        g = x.view(n, self.n_in_tiles, self.b).index_select(1, self.idx)
        g = g.view(n, self.n_out_tiles, self.k * self.b).transpose(0, 1)  # [O, N, K*b], strided view
        return torch.baddbmm(self.bias, g, self.blocks).transpose(0, 1).reshape(n, self.out_features)


class CSRLayer(nn.Module):
    def __init__(self, layer: PackedLayer):
        super().__init__()
        self.shape = (layer.out_features, layer.in_features)
        for name in ("crow", "col", "values", "bias"):
            self.register_buffer(name, _tensor(layer.tensors[name]))
        self._csr: torch.Tensor | None = None

    def weight(self) -> torch.Tensor:
        if self._csr is None or self._csr.device != self.values.device:
            # indices were range-checked when the layer was validated (formats.csr.CSR.validate)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "CSR support is in beta"
                self._csr = torch.sparse_csr_tensor(self.crow, self.col, self.values, self.shape,
                                                    check_invariants=False)
        return self._csr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # sparse.mm(W, x^T)^T is 3-15x faster than F.linear with a CSR weight (shared notes)
        return torch.sparse.mm(self.weight(), x.t()).t() + self.bias
