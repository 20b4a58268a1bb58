"""The ``fused`` CPU backend: the whole packed network as one compiled function (numba).

Why: at small batches a block-sparse layer's arithmetic is tiny, and onnxruntime and torch spend as
long on the ~10 small ops around each batched matmul (gather, reshapes, transposes, bias, ReLU) and
on intermediate tensors as on the matmul itself. Here one ``@njit`` function runs the encoder, every
block layer and the head, with bias and ReLU applied as each output is written:

* batches of 4 rows or more: per output tile, the rows' live input tiles are gathered four rows at a
  time into a small buffer that stays in L1, and each output unit pair is a dot product over it, so six
  vector loads feed eight FMAs and the sums stay in registers (``_rows4``);
* fewer rows: each output tile's weights are read as one sequential stream (layout [k*t, t]) while each
  input value is multiplied into t running sums; at batch 1 the weights come from memory, and a long
  stream is what the hardware prefetcher serves best (``_block_layer_rows``).

Only live tiles are stored and read, so compute and memory traffic shrink with the density. Every layer
runs in block form: dense layers (the dense twin) as tile-rows with every input tile live, so sparse
and dense are timed with the same kernel. CSR layers run densified (same function; no CSR kernel here).
The first call compiles (seconds); numba caches the machine code on disk for later processes.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .formats import PackedLayer, PackedNet

import numba  # imported only when the fused backend is asked for (runtime.load imports this module lazily)


SMALL_BATCH = 4  # below this many rows a layer streams its weights once per row (_block_layer_rows)


def _njit(fn):
    return numba.njit(fastmath=True, cache=True, nogil=True)(fn)


@_njit
def _patches(x, p, out):
    """Every p x p patch of x as one row of ``out`` (N * patches, >= C*p*p; the padding stays zero), in
    (image, patch row, patch column) order, copied one image row segment at a time."""
    n, channels, size = x.shape[0], x.shape[1], x.shape[2]
    grid = size // p
    for b in range(n):
        for c in range(channels):
            for py in range(grid):
                for i in range(p):
                    row = x[b, c, py * p + i]
                    m0 = (c * p + i) * p
                    for px in range(grid):
                        out[(b * grid + py) * grid + px, m0:m0 + p] = row[px * p:px * p + p]


@_njit
def _encoder(x, w, bias, p, out):
    """Patch conv (kernel = stride = p) + ReLU as a (patches x C*p*p) . (C*p*p x C_out) product. Row r of
    ``out`` viewed as (N * patches, C_out) is patch r, the model's (N, patch * C_out + c) feature order.
    ``w`` is (C_out, K) with K = C*p*p rounded up to a multiple of 8 (zero columns), so the dot products
    run on whole vectors."""
    grid = x.shape[2] // p
    patches = np.zeros((x.shape[0] * grid * grid, w.shape[1]), np.float32)
    _patches(x, p, patches)
    rows = out.reshape(patches.shape[0], w.shape[0])
    r0 = 0
    while r0 + 4 <= rows.shape[0]:
        _rows4(patches, w, r0, bias, 0, rows)
        r0 += 4
    while r0 < rows.shape[0]:
        _row_cols(patches[r0], w, 0, w.shape[0], bias, 0, rows[r0])
        r0 += 1


@_njit
def _rows4(g, wt, b0, bias, col, out):
    """out[b0:b0+4, col:col+t] = relu(g[b0:b0+4] @ wt.T + bias): dot products over the gathered inputs,
    4 rows x 2 outputs at a time, so 6 vector loads feed 8 FMAs and the 8 sums stay in registers."""
    t, width = wt.shape
    g0, g1, g2, g3 = g[b0], g[b0 + 1], g[b0 + 2], g[b0 + 3]
    for j in range(0, t - 1, 2):
        w0, w1 = wt[j], wt[j + 1]
        s00 = s01 = s10 = s11 = s20 = s21 = s30 = s31 = np.float32(0.0)
        for i in range(width):
            a0, a1, a2, a3, c0, c1 = g0[i], g1[i], g2[i], g3[i], w0[i], w1[i]
            s00 += a0 * c0
            s01 += a0 * c1
            s10 += a1 * c0
            s11 += a1 * c1
            s20 += a2 * c0
            s21 += a2 * c1
            s30 += a3 * c0
            s31 += a3 * c1
        b_0, b_1 = bias[col + j], bias[col + j + 1]
        out[b0, col + j], out[b0, col + j + 1] = max(s00 + b_0, 0.0), max(s01 + b_1, 0.0)
        out[b0 + 1, col + j], out[b0 + 1, col + j + 1] = max(s10 + b_0, 0.0), max(s11 + b_1, 0.0)
        out[b0 + 2, col + j], out[b0 + 2, col + j + 1] = max(s20 + b_0, 0.0), max(s21 + b_1, 0.0)
        out[b0 + 3, col + j], out[b0 + 3, col + j + 1] = max(s30 + b_0, 0.0), max(s31 + b_1, 0.0)
    if t % 2:
        for r in range(4):
            _row_cols(g[b0 + r], wt, t - 1, t, bias, col, out[b0 + r])


@_njit
def _row_cols(x, wt, j_start, j_end, bias, col, out_row):
    """One row, outputs j_start..j_end-1, four at a time (one vector load of x feeds four FMAs)."""
    width = wt.shape[1]
    j = j_start
    while j + 4 <= j_end:
        w0, w1, w2, w3 = wt[j], wt[j + 1], wt[j + 2], wt[j + 3]
        s0 = s1 = s2 = s3 = np.float32(0.0)
        for i in range(width):
            a = x[i]
            s0 += a * w0[i]
            s1 += a * w1[i]
            s2 += a * w2[i]
            s3 += a * w3[i]
        out_row[col + j] = max(s0 + bias[col + j], 0.0)
        out_row[col + j + 1] = max(s1 + bias[col + j + 1], 0.0)
        out_row[col + j + 2] = max(s2 + bias[col + j + 2], 0.0)
        out_row[col + j + 3] = max(s3 + bias[col + j + 3], 0.0)
        j += 4
    while j < j_end:
        w0 = wt[j]
        s = np.float32(0.0)
        for i in range(width):
            s += x[i] * w0[i]
        out_row[col + j] = max(s + bias[col + j], 0.0)
        j += 1


@_njit
def _gather(x, b0, rows, idx_o, t, g):
    """Copy the live input tiles idx_o of rows b0.. of x side by side into g (a few KB: stays in L1)."""
    for r in range(rows):
        xr, gr = x[b0 + r], g[r]
        for kk in range(idx_o.shape[0]):
            src = idx_o[kk] * t
            xs, gs = xr[src:src + t], gr[kk * t:(kk + 1) * t]
            for i in range(t):
                gs[i] = xs[i]


@_njit
def _block_layer(x, wts, idx, bias, out, g):
    """out = relu(x @ W.T + bias) for a layer stored as live tiles: wts[o] is output tile o's (t, k*t)
    weight over its k live input tiles idx[o]. Four rows at a time, the tiles are gathered into ``g``
    (4 x k*t), then output tile o of those rows is a dense (4 x k*t) . (k*t x t) product."""
    n, n_out, t = x.shape[0], idx.shape[0], wts.shape[1]
    for o in range(n_out):
        wt, col, b0 = wts[o], o * t, 0
        while b0 + 4 <= n:
            _gather(x, b0, 4, idx[o], t, g)
            _rows4(g, wt, 0, bias, col, out[b0:b0 + 4])
            b0 += 4
        while b0 < n:
            _gather(x, b0, 1, idx[o], t, g)
            _row_cols(g[0], wt, 0, t, bias, col, out[b0])
            b0 += 1


@_njit
def _block_layer_rows(x, blocks, idx, bias, out, acc):
    """The same layer for a few rows: blocks[o] is (k*t, t) (input unit major), read as one sequential
    stream per output tile while each input value is multiplied into the t running sums. At batch 1 the
    weights come from memory, not cache, and one long stream is what the hardware prefetcher follows best."""
    n, n_out, t = x.shape[0], idx.shape[0], blocks.shape[2]
    for o in range(n_out):
        col = o * t
        for b in range(n):
            for j in range(t):
                acc[j] = bias[col + j]
            for kk in range(idx.shape[1]):
                xs = x[b, idx[o, kk] * t:(idx[o, kk] + 1) * t]
                for i in range(t):
                    v, w = xs[i], blocks[o, kk * t + i]
                    for j in range(t):
                        acc[j] += v * w[j]
            for j in range(t):
                out[b, col + j] = max(acc[j], 0.0)


@_njit
def _head(x, w, bias, out):
    for b in range(x.shape[0]):
        for c in range(w.shape[0]):
            s = bias[c]
            for f in range(x.shape[1]):
                s += x[b, f] * w[c, f]
            out[b, c] = s


@_njit
def _forward(x, conv_w, conv_b, p, blocks, blocks_t, idxs, biases, head_w, head_b):
    n = x.shape[0]
    h = np.empty((n, conv_w.shape[0] * (x.shape[2] // p) ** 2), np.float32)
    _encoder(x, conv_w, conv_b, p, h)
    for li in range(len(blocks)):
        wts, idx = blocks_t[li], idxs[li]
        out = np.empty((n, idx.shape[0] * wts.shape[1]), np.float32)
        if n < SMALL_BATCH:
            _block_layer_rows(h, blocks[li], idx, biases[li], out, np.empty(wts.shape[1], np.float32))
        else:
            _block_layer(h, wts, idx, biases[li], out, np.empty((4, wts.shape[2]), np.float32))
        h = out
    logits = np.empty((n, head_w.shape[0]), np.float32)
    _head(h, head_w, head_b, logits)
    return logits


def _tile_size(layer: PackedLayer) -> int:
    """Tile size for running a dense layer in block form: the largest of 64, 32, ... dividing both widths."""
    g = math.gcd(layer.in_features, layer.out_features)
    return max(d for d in (64, 32, 16, 8, 4, 2, 1) if g % d == 0)


def _as_blocks(layer: PackedLayer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(blocks [O, K*t, t], idx [O, K], bias) of any packed layer."""
    if layer.format == "block":
        t = layer.tensors
        return t["blocks"].numpy(), t["idx"].numpy().astype(np.int64), t["bias"].numpy()
    size = _tile_size(layer)
    w = layer.dense_weight()  # [out, in]
    n_out, n_in = layer.out_features // size, layer.in_features // size
    blocks = w.view(n_out, size, n_in * size).transpose(1, 2)  # [O, in, t]: every input tile live, in order
    idx = np.tile(np.arange(n_in, dtype=np.int64), (n_out, 1))
    return blocks.contiguous().numpy(), idx, layer.tensors["bias"].numpy()


class FusedNet:
    """Callable (N, C, H, W) float32 -> (N, classes) logits running ``PackedNet`` through ``_forward``."""

    def __init__(self, packed: PackedNet):
        if not packed.layers:
            raise ValueError("the fused backend needs at least one hidden layer")
        as_f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
        layers = [_as_blocks(l) for l in packed.layers]
        # Both layouts (the weights are small): [O, k*t, t] streams best at batch < SMALL_BATCH; in
        # [O, t, k*t] row j of a tile-row is output unit j's weights, for the dot products of larger batches.
        self.blocks = tuple(as_f32(b) for b, _, _ in layers)
        self.blocks_t = tuple(as_f32(b.transpose(0, 2, 1)) for b, _, _ in layers)
        self.idxs = tuple(np.ascontiguousarray(i) for _, i, _ in layers)
        self.biases = tuple(as_f32(b) for _, _, b in layers)
        conv = packed.conv_weight.reshape(packed.conv_weight.shape[0], -1)
        self.conv_w = as_f32(torch.nn.functional.pad(conv, (0, -conv.shape[1] % 8)).numpy())  # (C_out, K8)
        self.conv_b = as_f32(packed.conv_bias.numpy())
        self.head_w, self.head_b = as_f32(packed.head_weight.numpy()), as_f32(packed.head_bias.numpy())
        self.patch_size = packed.patch_size
        self.input_shape = packed.input_shape

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(self.input_shape):
            raise ValueError(f"expected input (N, {', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}")
        return _forward(x, self.conv_w, self.conv_b, self.patch_size, self.blocks, self.blocks_t, self.idxs,
                        self.biases, self.head_w, self.head_b)


def fused_runner(packed: PackedNet):
    """A runtime ``run(x: Tensor) -> Tensor`` over ``FusedNet``, compiled (or loaded from numba's cache) now,
    so that the first request does not pay for it."""
    net = FusedNet(packed)
    net(np.zeros((1, *net.input_shape), np.float32))

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(net(x.detach().cpu().numpy()))
    return run
