"""The patch encoder, defined once: a conv with kernel = stride = patch size p, then ReLU, patch-major.

For an image x [C, H, W] with a g x g grid of patches (g = H / p), the feature vector is
``features[(py*g + px)*ch + c] = relu(sum_{c', i, j} x[c', py*p + i, px*p + j] * weight[c, c', i, j] + bias[c])``:
all channels of patch 0, then patch 1, ... (contiguous features are whole patches, so grouping by patch is
contiguous). Equivalently, ``relu(patchify(x) @ weight_matrix(weight) + bias)`` reshaped to (N, g*g*ch), which
is how the torch runtime computes it; the ONNX graph uses Conv + Transpose (NCHW -> NHWC) + Reshape, and the
fused backend reads each patch's rows of pixels from the image in place (``runtime.fused.layout.encoder_panels``). The training model
(``model.layers.PatchEncoder``) is the same conv; tests check every form against it.
"""
from __future__ import annotations

import numpy as np

# (N, C, g, p, g, p) -> (N, g_y, g_x, C, p_y, p_x): one row per patch, (c, i, j) within it
PATCH_AXES = (0, 2, 4, 1, 3, 5)


def patch_view_shape(n: int, c: int, grid: int, p: int) -> tuple[int, ...]:
    return (n, c, grid, p, grid, p)


def patchify(x: np.ndarray, p: int) -> np.ndarray:
    """(N, C, H, W) -> (N * patches, C*p*p), rows in (image, patch row, patch column) order."""
    n, c, size = x.shape[0], x.shape[1], x.shape[2]
    grid = size // p
    return x.reshape(patch_view_shape(n, c, grid, p)).transpose(PATCH_AXES).reshape(n * grid * grid, c * p * p)


def weight_matrix(conv_weight: np.ndarray) -> np.ndarray:
    """The conv weight [ch, C, p, p] as the [C*p*p, ch] matrix that multiplies ``patchify``'s rows."""
    return np.ascontiguousarray(conv_weight.reshape(conv_weight.shape[0], -1).T)


def encode(x: np.ndarray, conv_weight: np.ndarray, conv_bias: np.ndarray) -> np.ndarray:
    """The reference: (N, C, H, W) float32 -> (N, patches * ch) features."""
    p = conv_weight.shape[-1]
    h = np.maximum(patchify(x, p) @ weight_matrix(conv_weight) + conv_bias, 0)
    return h.reshape(x.shape[0], -1)


def onnx_nodes(graph, conv_weight: np.ndarray, conv_bias: np.ndarray, features: int, h: str) -> str:
    """The encoder as ONNX nodes over input ``h`` (N, C, H, W); returns the (N, features) output."""
    p = conv_weight.shape[-1]
    h = graph.op("Conv", [h, graph.const("encoder.weight", conv_weight), graph.const("encoder.bias", conv_bias)],
                 kernel_shape=[p, p], strides=[p, p])
    h = graph.op("Relu", [h])
    h = graph.op("Transpose", [h], perm=[0, 2, 3, 1])  # (N, ch, g, g) -> (N, g, g, ch): patch-major
    return graph.op("Reshape", [h, graph.shape("encoder.flat", [-1, features])])
