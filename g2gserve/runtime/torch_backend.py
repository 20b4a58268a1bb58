"""PyTorch execution of a ``PackedNet``: each layer runs as stored (its format's torch module), never re-densified."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from g2gserve.formats import PackedNet, encoder
from g2gserve.formats.torch_layers import BlockSparseLayer, from_tile_major, tile_major


class PackedModule(nn.Module):
    """The inference network of a ``PackedNet``: normalised images in, logits out.

    The patch encoder runs as patchify + one matmul (``formats.encoder``), which gives the patch-major
    features directly and costs a fraction of a conv call at small batches.
    """

    def __init__(self, packed: PackedNet):
        super().__init__()
        self.patch = packed.patch_size
        self.grid = packed.image_size // packed.patch_size
        self.register_buffer("enc_weight", torch.from_numpy(encoder.weight_matrix(packed.conv_weight)))  # [C*p*p, ch]
        self.register_buffer("enc_bias", torch.from_numpy(packed.conv_bias.copy()))
        self.hidden = nn.ModuleList(l.spec.torch_module(l) for l in packed.layers)
        self.register_buffer("head_weight", torch.from_numpy(packed.head_weight.copy()))
        self.register_buffer("head_bias", torch.from_numpy(packed.head_bias.copy()))
        self.eval()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        g, p = self.grid, self.patch
        patches = x.reshape(encoder.patch_view_shape(n, c, g, p)).permute(encoder.PATCH_AXES).reshape(n * g * g, c * p * p)
        return torch.relu_(torch.addmm(self.enc_bias, patches, self.enc_weight)).view(n, g * g * self.enc_weight.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encode(x)
        if h.shape[0] != 1:
            for layer in self.hidden:
                h = torch.relu_(layer(h))
            return F.linear(h, self.head_weight, self.head_bias)
        tiles = None  # batch 1: tile-major activations while consecutive block layers run (all views)
        for layer in self.hidden:
            if isinstance(layer, BlockSparseLayer):
                if tiles is None or tiles.shape[2] != layer.b:
                    tiles = tile_major(h if tiles is None else from_tile_major(tiles), layer.b)
                tiles = torch.relu_(layer.forward_tiles(tiles))
            else:
                if tiles is not None:
                    h, tiles = from_tile_major(tiles), None
                h = torch.relu_(layer(h))
        if tiles is not None:
            h = from_tile_major(tiles)
        return F.linear(h, self.head_weight, self.head_bias)
