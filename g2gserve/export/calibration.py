"""Static activation scales for int8 serving, calibrated at export on real training images.

Why: the fused int8 kernel multiplies uint8 inputs by int8 weights. Without calibration every layer's input is
staged per call, each row at a range of its own (a pass over the row for the range, another to quantise it):
costs that do not shrink with the density (static scales take ~18% off the int8 sparse forward at batch 64,
docs/kernel.md).
With one scale per layer output, fixed here once, each layer's epilogue writes the next layer's uint8 inputs
itself (``FusedNet(..., activation_scales=...)``) and the staging disappears; ``onnxruntime``'s
``quantize_static`` is the same idea for its graphs. Every scaled output is a ReLU's, so the zero point is 0 and
the scale is a high quantile of the calibration outputs over 255 (values above it saturate at 255): a quantile
rather than the maximum, so that one outlier does not coarsen every other value's step.

The scales are recorded in the manifest (``Calibration``); whether they are good enough is the precision gate's
call (``python -m g2gserve.runtime.precision EXPORT --backend fused --dtype int8-static``), on the test set, which
calibration never sees.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from g2gserve.bundle import Calibration
from g2gserve.formats import PackedNet

QUANTILE = 99.99          # percent of every layer's calibration outputs that stay below 255 steps
CALIBRATION_IMAGES = 2048  # training images, drawn with ``SEED``
SEED = 0


def layer_outputs(packed: PackedNet, x: np.ndarray) -> list[np.ndarray]:
    """The network in plain numpy (float32), for normalised input ``x`` (N, C, H, W): the encoder's output, each
    hidden layer's (after ReLU) and the logits, in packed unit order (as the fused backend computes them)."""
    n, c, h, w = x.shape
    p = packed.patch_size
    patches = (np.asarray(x, np.float32).reshape(n, c, h // p, p, w // p, p).transpose(0, 2, 4, 1, 3, 5)
               .reshape(n, (h // p) * (w // p), c * p * p))
    conv = packed.conv_weight.reshape(packed.conv_weight.shape[0], -1)
    out = np.maximum(patches @ conv.T + packed.conv_bias, 0).reshape(n, -1)  # patch-major features
    outputs = [out]
    for layer in packed.layers:
        out = np.maximum(out @ layer.dense_weight().T + layer.tensors["bias"], 0)
        outputs.append(out)
    outputs.append(out @ packed.head_weight.T + packed.head_bias)
    return outputs


def activation_scales(packed: PackedNet, x: np.ndarray, quantile: float = QUANTILE) -> list[float]:
    """One uint8 step per layer output (encoder, hidden layers): the ``quantile`` of its outputs on ``x`` / 255."""
    scales = []
    for out in layer_outputs(packed, x)[:-1]:
        top = float(np.percentile(out, quantile))
        scales.append(top / 255 if top > 0 else 1.0)  # a layer that never fires: any step will do
    return scales


def calibration_images(dataset: str | None, input_shape: tuple[int, ...], data_dir: str | Path | None = None,
                       n: int = CALIBRATION_IMAGES) -> tuple[np.ndarray, str] | None:
    """``n`` real training images of ``dataset`` (uint8, drawn with ``SEED``; never downloaded), or None where
    there are none (no data set named, or not found): calibrating on synthetic images would be meaningless."""
    from g2gserve.data.datasets import DataError, load_split
    if not dataset:
        return None
    try:
        train = load_split(dataset, "train", data_dir, download=False)
    except DataError:
        return None
    if tuple(train.x.shape[1:]) != tuple(input_shape):
        return None
    n = min(n, len(train))
    idx = np.sort(np.random.default_rng(SEED).choice(len(train), n, replace=False))
    return np.asarray(train.x[idx]), f"{dataset} train set ({n} images, seed {SEED})"


def calibrate(packed: PackedNet, preprocess, dataset: str | None, data_dir: str | Path | None = None,
              n: int = CALIBRATION_IMAGES, quantile: float = QUANTILE) -> Calibration | None:
    """The manifest's ``calibration``: scales from real training images, or None where there are none."""
    found = calibration_images(dataset, packed.input_shape, data_dir, n)
    if found is None:
        return None
    images, source = found
    scales = activation_scales(packed, np.asarray(preprocess(images), np.float32), quantile)
    return Calibration(source, len(images), quantile, scales)
