"""Reduced-precision CPU models for g2g-bench, so that a bf16 sparse kernel is compared best vs best.

``fused-bf16`` is the fused backend with bfloat16 weights (fp32 sums), ``fused-int8`` with int8 weights and
per-row uint8 inputs (VNNI, int32 sums); ``onnxruntime-int8`` is each ONNX
graph after onnxruntime's own ``quantize_dynamic`` (int8 weights, activations quantised per call): the
quantised dense model onnxruntime users would reach for. Both are benchmark-only backend names.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from g2gserve.runtime import load
from g2gserve.runtime.loader import InferenceModel

REDUCED = {"fused-bf16": "bf16", "fused-int8": "int8", "onnxruntime-int8": "int8"}  # backend name -> precision


def precision_of(backend: str) -> str:
    """fp32 for the runtime's own backends."""
    return REDUCED.get(backend, "fp32")


def quantized_onnx(source: Path, threads: int | None):
    """An onnxruntime session over ``quantize_dynamic(source)`` (int8 weights), quantised in a temporary folder."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from g2gserve.runtime.ort import ort_session
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "int8.onnx"
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
        return ort_session(target, threads)


def load_bench_model(path: Path, backend: str, variant: str, device: str, threads: int) -> InferenceModel:
    """``runtime.load`` for the runtime's backends, and the reduced-precision ones above."""
    if backend in ("fused-bf16", "fused-int8"):
        return load(path, backend="fused", device=device, variant=variant, threads=threads,
                    dtype=REDUCED[backend])
    if backend != "onnxruntime-int8":
        return load(path, backend=backend, device=device, variant=variant, threads=threads)
    if not Path(path).is_dir():
        raise ValueError("onnxruntime-int8 needs an export directory (it quantises its model.onnx / dense.onnx)")
    base = load(path, backend="onnxruntime", device=device, variant=variant, threads=threads)
    session = quantized_onnx(Path(path) / ("model.onnx" if variant == "sparse" else "dense.onnx"), threads)

    def run(x):
        return session.run(None, {"input": np.asarray(x, np.float32)})[0]
    return InferenceModel(run, base.preprocess, base.classes, base.manifest, backend, base.device, variant)
