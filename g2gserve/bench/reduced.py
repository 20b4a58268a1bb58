"""Reduced-precision CPU models for g2g-bench, so that a reduced-precision sparse kernel is compared best vs best.

``fused-bf16`` is the fused backend with bfloat16 weights (fp32 sums), ``fused-int8`` with int8 weights and
per-row uint8 inputs (VNNI, int32 sums), ``fused-int8-static`` the same at the activation scales calibrated at
export (no per-call staging). ``onnxruntime-int8`` is each ONNX graph after onnxruntime's own ``quantize_dynamic``
(int8 weights, activations quantised per call) and ``onnxruntime-int8-static`` after its pre-processing and
``quantize_static`` (QDQ, per-tensor, calibrated on the same training images as the export's scales): the quantised dense models
onnxruntime users would reach for. All are benchmark-only backend names.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from g2gserve.runtime import load
from g2gserve.runtime.loader import InferenceModel

# backend name -> precision
REDUCED = {"fused-bf16": "bf16", "fused-int8": "int8", "fused-int8-static": "int8-static", "onnxruntime-int8": "int8",
           "onnxruntime-int8-static": "int8-static"}


def runnable() -> list[str]:
    """The reduced-precision backends this CPU runs (the fused ones need AVX512-BF16 / AVX512-VNNI)."""
    from g2gserve.runtime.fused import supported
    return [b for b, p in REDUCED.items() if not b.startswith("fused-") or supported("avx512", p.removesuffix("-static"))]


def precision_of(backend: str) -> str:
    """fp32 for the runtime's own backends."""
    return REDUCED.get(backend, "fp32")


def quantized_onnx(source: Path, threads: int | None, calibration: np.ndarray | None = None):
    """An onnxruntime session over ``quantize_dynamic(source)`` (int8 weights), or with ``calibration`` (normalised
    float32 inputs) over ``quantize_static(source)``; quantised in a temporary folder."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)

    from g2gserve.runtime.ort import ort_session

    class Batches(CalibrationDataReader):
        def __init__(self, x: np.ndarray):
            self.batches = iter([{"input": x[i:i + 256]} for i in range(0, len(x), 256)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "int8.onnx"
        if calibration is None:
            quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
        else:  # onnxruntime's recommended flow: its pre-processing (shape inference, graph optimisation; ~2% faster
            # here), then QDQ with per-tensor weights (its QLinearMatMul refuses per-channel ones in the block graph)
            from onnxruntime.quantization.shape_inference import quant_pre_process
            prepared = Path(tmp) / "prepared.onnx"
            quant_pre_process(str(source), str(prepared))
            quantize_static(str(prepared), str(target), Batches(calibration), quant_format=QuantFormat.QDQ,
                            per_channel=False, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return ort_session(target, threads)


def _calibration_inputs(path: Path, base: InferenceModel, data_dir: Path | None) -> np.ndarray:
    """The export's own calibration images (the same draw), normalised."""
    from g2gserve.export.calibration import calibration_images
    recorded = base.manifest.get("calibration")
    if not recorded:
        raise ValueError(f"{path} has no int8 calibration; re-export it with real training images (--data-dir)")
    found = calibration_images(base.manifest.get("dataset"), base.input_shape, data_dir, recorded["images"])
    if found is None:
        raise ValueError(f"onnxruntime-int8-static calibrates on the {base.manifest.get('dataset')} training images "
                         "the export used; none found (pass --data-dir)")
    return np.asarray(base.preprocess(found[0]), np.float32)


def load_bench_model(path: Path, backend: str, variant: str, device: str, threads: int,
                     data_dir: Path | None = None) -> InferenceModel:
    """``runtime.load`` for the runtime's backends, and the reduced-precision ones above (``data_dir``: where the
    training images for onnxruntime's static calibration are)."""
    if backend.startswith("fused-"):
        return load(path, backend="fused", device=device, variant=variant, threads=threads, dtype=REDUCED[backend])
    if backend not in ("onnxruntime-int8", "onnxruntime-int8-static"):
        return load(path, backend=backend, device=device, variant=variant, threads=threads)
    if not Path(path).is_dir():
        raise ValueError(f"{backend} needs an export directory (it quantises its model.onnx / dense.onnx)")
    base = load(path, backend="onnxruntime", device=device, variant=variant, threads=threads)
    calibration = _calibration_inputs(Path(path), base, data_dir) if backend.endswith("-static") else None
    session = quantized_onnx(Path(path) / ("model.onnx" if variant == "sparse" else "dense.onnx"), threads, calibration)

    def run(x):
        return session.run(None, {"input": np.asarray(x, np.float32)})[0]
    return InferenceModel(run, base.preprocess, base.classes, base.manifest, backend, base.device, variant)
