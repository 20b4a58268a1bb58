"""``load(MODEL)``: an inference model from an export directory or a ``model.pt``.

    model = load("runs/fmnist/export", backend="onnxruntime")
    probs = model.predict(images_uint8)        # (N, C, H, W) uint8 -> (N, classes) float32 numpy probabilities

The torch backend executes the compact formats directly (block gather + bmm, CSR) on CPU or CUDA;
the onnxruntime backend runs ``model.onnx``; the fused backend runs the whole network as one compiled
CPU function over the live tiles (numba; ``threads`` share its panels; dtype "bf16" / "int8" opt-in); the
triton backend is the torch one with its block layers in one fused Triton kernel each and its patch encoder in
another (CUDA). ``variant="dense"``
loads the dense twin of the same function (``dense.onnx`` / dense tensors) for side-by-side comparisons. The
torch and triton backends take a precision (``dtype``, see ``runtime.precision``) and, on CUDA with
``max_batch``, replay CUDA graphs per batch bucket.

Only the torch and triton backends import torch: with onnxruntime or fused, loading an export directory,
preprocessing and softmax are numpy, so a serving install needs no torch (``pip install 'g2gserve[serve]'``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from g2gserve.bundle import Bundle, ExportError, read_bundle
from g2gserve.data.preprocess import Preprocess
from g2gserve.errors import CheckpointError
from g2gserve.formats import PackedNet, densify
from g2gserve.runtime.precision import DTYPES, check_dtype, dtypes_for

BACKENDS = ("torch", "onnxruntime", "fused", "triton")
CPU_BACKENDS = ("torch", "onnxruntime", "fused")
TORCH_BACKENDS = ("torch", "triton")
VARIANTS = ("sparse", "dense")


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in numpy (max subtracted first, so large logits do not overflow)."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z, dtype=np.float32)
    return e / e.sum(axis=1, keepdims=True)


class InferenceModel:
    """A loaded model: ``predict`` takes uint8 images, applies the training preprocessing, returns probabilities."""

    def __init__(self, run: Callable[[Any], Any], preprocess: Preprocess, classes: list[str], manifest: dict,
                 backend: str, device: Any, variant: str, dtype: str = "fp32"):
        self._run = run
        self.preprocess, self.classes, self.manifest = preprocess, classes, manifest
        self.backend, self.device, self.variant, self.dtype = backend, device, variant, dtype

    @property
    def name(self) -> str:
        return self.manifest.get("name", "g2gnet")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.preprocess.input_shape

    def logits(self, x):
        """Logits for already-normalised float32 input (N, C, H, W): numpy in, numpy out. The torch backend
        also takes a torch tensor (on its device) and then returns one, so benchmarks time no copies."""
        return self._run(x)

    def predict(self, images) -> np.ndarray:
        """(N, C, H, W) uint8 images (numpy; CPU torch tensors accepted) -> (N, classes) float32 probabilities."""
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise ValueError(f"predict expects uint8 images, got {images.dtype}")
        return softmax(np.asarray(self._run(self.preprocess(images)), dtype=np.float32))


def open_bundle(path: str | Path, onnx_graphs: bool = True) -> Bundle:
    """The bundle of an export directory (validated) or of a ``model.pt`` (packed in memory; needs torch, and
    onnx when ``onnx_graphs``). The one entry point above both for every runtime."""
    path = Path(path)
    if path.is_dir():
        return read_bundle(path)
    if path.is_file():
        from g2gserve.export.writer import build_artifacts
        from g2gserve.model.checkpoint import load_model
        model, ckpt = load_model(path)
        return build_artifacts(model, ckpt, name=path.parent.name or path.stem, onnx_graphs=onnx_graphs).bundle
    raise FileNotFoundError(f"{path}: no such export directory or checkpoint")


def _import(module: str, backend: str, install: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise ImportError(f"the {backend} backend needs {module}, which is not installed: {install}") from e


def _torch_runner(packed: PackedNet, device: str, backend: str = "torch", dtype: str = "fp32",
                  max_batch: int | None = None):
    """The network as a torch module (triton: block layers in the Triton kernel) on ``device`` at ``dtype``;
    on CUDA with ``max_batch``, behind CUDA graphs captured now for every batch bucket."""
    torch = _import("torch", backend, "pip install 'g2gserve[train]' (or install torch)")
    from g2gserve.runtime.precision import cast_runner
    dev = torch.device(device)
    if backend == "triton":
        from g2gserve.runtime import triton_kernel  # imports triton: only for this backend
        from g2gserve.runtime.triton_backend import TritonModule
        if dev.type != "cuda" and not triton_kernel.INTERPRETED:
            raise ValueError("the triton backend runs on CUDA (or on the CPU under TRITON_INTERPRET=1, for tests)")
        module = TritonModule(packed)
    else:
        from g2gserve.runtime.torch_backend import PackedModule
        module = PackedModule(packed)
    forward = cast_runner(module.to(dev), dtype)
    if dev.type == "cuda" and max_batch:
        from g2gserve.runtime.cuda_graphs import GraphRunner
        forward = GraphRunner(forward, packed.input_shape, dev, max_batch)
        forward.capture_all()  # at load, so no request pays for a capture

    def run(x):
        if isinstance(x, torch.Tensor):
            return forward(x.to(dev, torch.float32, non_blocking=True))
        return forward(torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(dev)).cpu().numpy()
    return run, dev


def _fused_runner(packed: PackedNet, threads: int | None, dtype: str, bundle: Bundle):
    """int8-static: int8 with the bundle's calibrated activation scales (``export.calibration``), so no layer input
    is staged per call; int8: each row's inputs at a range of their own, for any bundle."""
    _import("numba", "fused", "pip install 'g2gserve[serve]' (or install numba)")
    from g2gserve.runtime.fused import FusedNet
    scales = None
    if dtype == "int8-static":
        if bundle.manifest.calibration is None:
            raise ValueError(f"{bundle.directory or 'this model'} has no int8 calibration (it is made at export from "
                             "real training images: g2g-export --data-dir DIR); use dtype int8 (per-row scales)")
        scales = bundle.manifest.calibration.activation_scales
    net = FusedNet(packed, precision=dtype.removesuffix("-static"), threads=threads or 1, activation_scales=scales)
    net(np.zeros((1, *net.input_shape), np.float32))  # compile (or load numba's cache) now, not on the first request
    return net  # converts its input itself: no wrapper (a batch-1 forward takes ~40 us, so a Python call counts)


def _ort_runner(bundle: Bundle, variant: str, threads: int | None):
    from g2gserve.runtime.ort import ort_session
    _import("onnxruntime", "onnxruntime", "pip install 'g2gserve[serve]' (or install onnxruntime)")
    try:
        session = ort_session(bundle.onnx_source(variant), threads)
    except Exception as e:  # onnxruntime raises its own exception types for bad graphs
        raise ExportError(f"{bundle.directory}: onnxruntime cannot load the graph ({e})") from e
    return lambda x: session.run(None, {"input": np.asarray(x, np.float32)})[0]


def load(path: str | Path, backend: str = "torch", device: str = "cpu", variant: str = "sparse",
         threads: int | None = None, dtype: str = "fp32", max_batch: int | None = None) -> InferenceModel:
    """Load an export directory (validated) or a checkpoint (exported in memory).

    ``dtype`` (torch and triton backends): fp32, tf32, bf16 or fp16; fused backend: fp32, bf16 (bfloat16
    weights, AVX512-BF16 CPUs), int8 (int8 weights, AVX512-VNNI CPUs, each row's inputs quantised per call) or
    int8-static (the same at the activation scales calibrated at export: faster, needs the bundle's calibration). With ``max_batch`` on CUDA, forward
    passes replay CUDA graphs captured per power-of-two batch bucket up to ``max_batch``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose sparse or dense")
    if backend == "fused":
        if dtype not in dtypes_for("fused"):
            raise ValueError(f"the fused backend computes in {', '.join(dtypes_for('fused'))}; got dtype {dtype!r}")
    else:
        check_dtype(dtype)
    if backend not in TORCH_BACKENDS and device not in ("cpu", "auto"):
        raise ValueError(f"the {backend} backend runs on the CPU; use backend torch or triton for CUDA")
    if backend not in TORCH_BACKENDS and backend != "fused" and dtype != "fp32":
        raise ValueError(f"the {backend} backend computes in fp32; dtype {dtype} needs backend torch or triton")
    if backend in TORCH_BACKENDS:
        torch = _import("torch", backend, "pip install 'g2gserve[train]' (or install torch)")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda asked for but torch sees no CUDA device")
    bundle = open_bundle(path, onnx_graphs=(backend == "onnxruntime"))
    packed = densify(bundle.packed) if variant == "dense" else bundle.packed
    dev: Any = "cpu"
    if backend in TORCH_BACKENDS:
        run, dev = _torch_runner(packed, device, backend, dtype, max_batch)
    elif backend == "fused":
        run = _fused_runner(packed, threads, dtype, bundle)
    else:
        run = _ort_runner(bundle, variant, threads)
    m = bundle.manifest
    return InferenceModel(run, Preprocess.from_dict(m.preprocess), list(m.classes), m.to_dict(), backend, dev, variant,
                          dtype)


__all__ = ["load", "open_bundle", "softmax", "InferenceModel", "ExportError", "CheckpointError", "BACKENDS",
           "CPU_BACKENDS", "DTYPES", "VARIANTS"]
