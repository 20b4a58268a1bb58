"""The ``fused`` CPU backend: the whole packed network as one compiled loop nest (numba).

Why: at small batches a block-sparse layer's arithmetic is tiny, and onnxruntime and torch spend as
long on the ~10 small ops around each batched matmul (gather, reshapes, transposes, bias, ReLU) and
on intermediate tensors as on the matmul itself. Here one ``@njit`` function walks the live tiles:
for each output tile and each batch row (four rows at a time, so a weight row is loaded once for
four rows), it accumulates ``x[tile] @ W[tile]`` into a row buffer, adds the bias and applies the
ReLU, and never materialises a gathered copy. Weights stay in the packed layout (only live tiles are
read), so the memory traffic shrinks with the density, which is what bounds latency at batch 1.

Every layer runs in block form: block layers as stored, dense layers (the dense twin) as one tile-row
per output tile with every input tile live, so sparse and dense are timed with the same kernel.
CSR layers are run densified (same function; this backend has no CSR kernel). The first call
compiles (a few seconds) and numba caches the machine code on disk for later processes.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .formats import PackedLayer, PackedNet

try:  # numba is a dependency; the import is guarded so the rest of the package works without it
    import numba
except ImportError:  # pragma: no cover - exercised only in broken installs
    numba = None


def _njit(fn):
    return numba.njit(fastmath=True, cache=True, nogil=True)(fn) if numba is not None else fn


@_njit
def _encoder(x, w, bias, p, out, patch):
    """Patch conv (kernel = stride = p) + ReLU into out[b, patch * C_out + c] (patch-major features)."""
    n, c_in, size = x.shape[0], x.shape[1], x.shape[2]
    grid, c_out, m = size // p, w.shape[0], w.shape[1]
    for b in range(n):
        for py in range(grid):
            for px in range(grid):
                q = 0
                for c in range(c_in):
                    for i in range(p):
                        for j in range(p):
                            patch[q] = x[b, c, py * p + i, px * p + j]
                            q += 1
                base = (py * grid + px) * c_out
                for o in range(c_out):
                    s = bias[o]
                    for q in range(m):
                        s += patch[q] * w[o, q]
                    out[b, base + o] = s if s > 0.0 else 0.0


@_njit
def _block_layer(x, blocks, idx, bias, t, out, acc):
    """out = relu(x @ W + bias) for a layer stored as live tiles: blocks[o] is (k*t, t), idx[o] its input tiles."""
    n = x.shape[0]
    n_out, k = idx.shape
    for o in range(n_out):
        col = o * t
        for b0 in range(0, n, 4):
            rows = min(4, n - b0)
            for r in range(rows):
                for j in range(t):
                    acc[r, j] = bias[col + j]
            for kk in range(k):
                src = idx[o, kk] * t
                for i in range(t):
                    w = blocks[o, kk * t + i]
                    if rows == 4:
                        x0, x1, x2, x3 = x[b0, src + i], x[b0 + 1, src + i], x[b0 + 2, src + i], x[b0 + 3, src + i]
                        for j in range(t):
                            wj = w[j]
                            acc[0, j] += x0 * wj
                            acc[1, j] += x1 * wj
                            acc[2, j] += x2 * wj
                            acc[3, j] += x3 * wj
                    else:
                        for r in range(rows):
                            xv = x[b0 + r, src + i]
                            for j in range(t):
                                acc[r, j] += xv * w[j]
            for r in range(rows):
                for j in range(t):
                    v = acc[r, j]
                    out[b0 + r, col + j] = v if v > 0.0 else 0.0


@_njit
def _head(x, w, bias, out):
    for b in range(x.shape[0]):
        for c in range(w.shape[0]):
            s = bias[c]
            for f in range(x.shape[1]):
                s += x[b, f] * w[c, f]
            out[b, c] = s


@_njit
def _forward(x, conv_w, conv_b, p, blocks, idxs, biases, tiles, head_w, head_b):
    n = x.shape[0]
    h = np.empty((n, conv_w.shape[0] * (x.shape[2] // p) ** 2), np.float32)
    _encoder(x, conv_w, conv_b, p, h, np.empty(conv_w.shape[1], np.float32))
    for li in range(len(blocks)):
        t = tiles[li]
        out = np.empty((n, idxs[li].shape[0] * t), np.float32)
        _block_layer(h, blocks[li], idxs[li], biases[li], t, out, np.empty((4, t), np.float32))
        h = out
    logits = np.empty((n, head_w.shape[0]), np.float32)
    _head(h, head_w, head_b, logits)
    return logits


def _tile_size(layer: PackedLayer) -> int:
    """Tile size for running a dense layer in block form: the largest of 64, 32, ... dividing both widths."""
    g = math.gcd(layer.in_features, layer.out_features)
    return max(d for d in (64, 32, 16, 8, 4, 2, 1) if g % d == 0)


def _as_blocks(layer: PackedLayer) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(blocks [O, K*t, t], idx [O, K], bias, t) of any packed layer."""
    if layer.format == "block":
        t = layer.tensors
        return (t["blocks"].numpy(), t["idx"].numpy().astype(np.int64), t["bias"].numpy(), layer.block_size)
    size = _tile_size(layer)
    w = layer.dense_weight()  # [out, in]
    n_out, n_in = layer.out_features // size, layer.in_features // size
    blocks = w.view(n_out, size, n_in * size).transpose(1, 2)  # [O, in, t]: every input tile live, in order
    idx = np.tile(np.arange(n_in, dtype=np.int64), (n_out, 1))
    return blocks.contiguous().numpy(), idx, layer.tensors["bias"].numpy(), size


class FusedNet:
    """Callable (N, C, H, W) float32 -> (N, classes) logits running ``PackedNet`` through ``_forward``."""

    def __init__(self, packed: PackedNet):
        if numba is None:
            raise RuntimeError("the fused backend needs numba (pip install numba)")
        if not packed.layers:
            raise ValueError("the fused backend needs at least one hidden layer")
        as_f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
        layers = [_as_blocks(l) for l in packed.layers]
        self.blocks = tuple(as_f32(b) for b, _, _, _ in layers)
        self.idxs = tuple(np.ascontiguousarray(i) for _, i, _, _ in layers)
        self.biases = tuple(as_f32(b) for _, _, b, _ in layers)
        self.tiles = tuple(int(t) for _, _, _, t in layers)
        self.conv_w = as_f32(packed.conv_weight.reshape(packed.conv_weight.shape[0], -1).numpy())
        self.conv_b = as_f32(packed.conv_bias.numpy())
        self.head_w, self.head_b = as_f32(packed.head_weight.numpy()), as_f32(packed.head_bias.numpy())
        self.patch_size = packed.patch_size
        self.input_shape = packed.input_shape

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(self.input_shape):
            raise ValueError(f"expected input (N, {', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}")
        return _forward(x, self.conv_w, self.conv_b, self.patch_size, self.blocks, self.idxs, self.biases,
                        self.tiles, self.head_w, self.head_b)


def fused_runner(packed: PackedNet):
    """A runtime ``run(x: Tensor) -> Tensor`` over ``FusedNet``, compiled (or loaded from numba's cache) now,
    so that the first request does not pay for it."""
    net = FusedNet(packed)
    net(np.zeros((1, *net.input_shape), np.float32))

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(net(x.detach().cpu().numpy()))
    return run
