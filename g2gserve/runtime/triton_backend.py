"""The ``triton`` backend: the torch backend's network with every block-sparse layer run by the fused Triton
kernel (``triton_kernel.block_sparse_linear``, bias and ReLU included) and the patch encoder by its own
(``triton_encoder.patch_encode``: image in place, input cast, bias and ReLU in one launch). Dense/CSR layers and
the head stay as the torch backend runs them (cuBLAS / cuSPARSE), as does an encoder the kernel cannot take."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from g2gserve.formats import PackedLayer, PackedNet
from g2gserve.runtime.precision import allows_tf32
from g2gserve.runtime.torch_backend import PackedModule
from g2gserve.runtime.triton_encoder import patch_encode, supports as encoder_supports
from g2gserve.runtime.triton_kernel import block_sparse_linear, supports


class TritonBlockLayer(nn.Module):
    """A block-sparse layer plus its ReLU in one kernel launch."""

    def __init__(self, layer: PackedLayer):
        super().__init__()
        t = layer.tensors  # numpy (formats.block): copied, the module owns its buffers
        self.register_buffer("blocks", torch.from_numpy(np.array(t["blocks"], np.float32)))  # [O, K*b, b]
        self.register_buffer("idx", torch.from_numpy(np.array(t["idx"], np.int32)))  # [O, K]
        self.register_buffer("bias", torch.from_numpy(np.array(t["bias"], np.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return block_sparse_linear(x, self.blocks, self.idx, self.bias, relu=True, allow_tf32=allows_tf32())


class ReLU(nn.Module):
    """Another format's layer followed by its ReLU (the block layers apply theirs inside the kernel)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu_(self.layer(x))


class TritonModule(nn.Module):
    """Normalised images in, logits out; block layers whose tile size the kernel supports run in Triton, and the
    patch encoder too where its kernel takes it (``fused_encoder``). Then the module takes float32 images whatever
    its precision and converts them itself (``casts_input``: ``precision.cast_runner`` leaves them as they are),
    so the input is read once, by the encoder, instead of cast in a pass of its own first."""

    def __init__(self, packed: PackedNet):
        super().__init__()
        self.base = PackedModule(packed)  # encoder, head and the layers the kernel does not take
        self.hidden = nn.ModuleList(
            TritonBlockLayer(spec) if spec.format == "block" and supports(spec.block_size) else ReLU(layer)
            for spec, layer in zip(packed.layers, self.base.hidden))
        self.base.hidden = nn.ModuleList()  # its copies of the layers are held by self.hidden now
        self.kernel_layers = sum(isinstance(m, TritonBlockLayer) for m in self.hidden)
        self.fused_encoder = self.casts_input = encoder_supports(*self.base.enc_weight.shape)
        self.eval()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_encoder:
            return patch_encode(x, self.base.enc_weight, self.base.enc_bias, self.base.patch, allows_tf32())
        return self.base.encode(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encode(x)
        for layer in self.hidden:
            h = layer(h)
        return F.linear(h, self.base.head_weight, self.base.head_bias)
