"""PyTorch execution of a ``PackedNet``: block-sparse and CSR layers run as stored, never re-densified."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from g2gserve.formats import PackedLayer, PackedNet


class DenseLayer(nn.Module):
    def __init__(self, layer: PackedLayer):
        super().__init__()
        self.register_buffer("weight", layer.tensors["weight"].clone())
        self.register_buffer("bias", layer.tensors["bias"].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class BlockSparseLayer(nn.Module):
    """Gather the live input tiles of every output tile-row, then one batched matmul over tile-rows.

    Works on *tile-major* activations (n_tiles, N, b): the gather is then along the outermost axis
    and the output is already tile-major for the next block layer, so a chain of block layers needs
    no transposes (at batch 1 every reshape is free). ``forward`` accepts the usual (N, features).
    """

    def __init__(self, layer: PackedLayer):
        super().__init__()
        blocks, idx = layer.tensors["blocks"], layer.tensors["idx"]
        self.b = layer.block_size
        self.n_out_tiles, self.k = idx.shape
        self.n_in_tiles = layer.in_features // self.b
        self.out_features = layer.out_features
        self.register_buffer("blocks", blocks.clone())  # [O, K*b, b]
        self.register_buffer("idx", idx.reshape(-1).clone())  # [O*K]
        self.register_buffer("bias", layer.tensors["bias"].clone().view(self.n_out_tiles, 1, self.b))

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


def to_tiles(x: torch.Tensor, b: int) -> torch.Tensor:
    """(N, features) -> tile-major (features / b, N, b) view."""
    return x.view(x.shape[0], -1, b).transpose(0, 1)


def from_tiles(h: torch.Tensor) -> torch.Tensor:
    """Tile-major (tiles, N, b) -> (N, tiles * b)."""
    return h.transpose(0, 1).reshape(h.shape[1], -1)


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
    """The inference network of a ``PackedNet``: normalised images in, logits out.

    The patch encoder (conv with kernel = stride = patch) runs as patchify + one matmul, which gives
    the patch-major features directly and costs a fraction of a conv call at small batches.
    """

    def __init__(self, packed: PackedNet):
        super().__init__()
        self.patch = packed.patch_size
        self.grid = packed.image_size // packed.patch_size
        channels = packed.conv_weight.shape[0]
        self.register_buffer("enc_weight", packed.conv_weight.reshape(channels, -1).t().contiguous())  # [C*p*p, ch]
        self.register_buffer("enc_bias", packed.conv_bias.clone())
        self.hidden = nn.ModuleList(LAYERS[l.format](l) for l in packed.layers)
        self.register_buffer("head_weight", packed.head_weight.clone())
        self.register_buffer("head_bias", packed.head_bias.clone())
        self.eval()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        g, p = self.grid, self.patch
        patches = x.reshape(n, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(n * g * g, c * p * p)
        return torch.relu_(torch.addmm(self.enc_bias, patches, self.enc_weight)).view(n, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encode(x)
        if h.shape[0] > 1:
            for layer in self.hidden:
                h = torch.relu_(layer(h))
            return F.linear(h, self.head_weight, self.head_bias)
        tiles = None  # batch 1: tile-major activations while consecutive block layers run (all views)
        for layer in self.hidden:
            if isinstance(layer, BlockSparseLayer):
                if tiles is None or tiles.shape[2] != layer.b:
                    tiles = to_tiles(h if tiles is None else from_tiles(tiles), layer.b)
                tiles = torch.relu_(layer.forward_tiles(tiles))
            else:
                if tiles is not None:
                    h, tiles = from_tiles(tiles), None
                h = torch.relu_(layer(h))
        if tiles is not None:
            h = from_tiles(tiles)
        return F.linear(h, self.head_weight, self.head_bias)
