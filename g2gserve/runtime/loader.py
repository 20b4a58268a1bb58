"""``load(MODEL)``: an inference model from an export directory or a ``model.pt``.

    model = load("runs/fmnist/export", backend="onnxruntime")
    probs = model.predict(images_uint8)        # (N, C, H, W) uint8 -> (N, classes) float32 numpy probabilities

The torch backend executes the compact formats directly (block gather + bmm, CSR) on CPU or CUDA;
the onnxruntime backend runs ``model.onnx``; the fused backend runs the whole network as one compiled
CPU function over the live tiles (numba). ``variant="dense"`` loads the dense twin of the same function
(``dense.onnx`` / dense tensors) for side-by-side comparisons.

Only the torch backend imports torch: with onnxruntime or fused, loading an export directory, preprocessing
and softmax are numpy, so a serving install needs no torch (``pip install 'g2gserve[serve]'``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from g2gserve.bundle import Bundle, ExportError, read_bundle
from g2gserve.data.preprocess import Preprocess
from g2gserve.errors import CheckpointError
from g2gserve.formats import PackedNet, densify

BACKENDS = ("torch", "onnxruntime", "fused")
VARIANTS = ("sparse", "dense")


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in numpy (max subtracted first, so large logits do not overflow)."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z, dtype=np.float32)
    return e / e.sum(axis=1, keepdims=True)


class InferenceModel:
    """A loaded model: ``predict`` takes uint8 images, applies the training preprocessing, returns probabilities."""

    def __init__(self, run: Callable[[Any], Any], preprocess: Preprocess, classes: list[str], manifest: dict,
                 backend: str, device: Any, variant: str):
        self._run = run
        self.preprocess, self.classes, self.manifest = preprocess, classes, manifest
        self.backend, self.device, self.variant = backend, device, variant

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


def _torch_runner(packed: PackedNet, device: str):
    torch = _import("torch", "torch", "pip install 'g2gserve[train]' (or install torch)")
    from g2gserve.runtime.torch_backend import PackedModule
    dev = torch.device(device)
    module = PackedModule(packed).to(dev)

    @torch.inference_mode()
    def run(x):
        if isinstance(x, torch.Tensor):
            return module(x.to(dev, non_blocking=True))
        return module(torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(dev)).cpu().numpy()
    return run, dev


def _fused_runner(packed: PackedNet):
    _import("numba", "fused", "pip install 'g2gserve[serve]' (or install numba)")
    from g2gserve.runtime.fused import FusedNet
    net = FusedNet(packed)
    net(np.zeros((1, *net.input_shape), np.float32))  # compile (or load numba's cache) now, not on the first request
    return lambda x: net(np.asarray(x, np.float32))


def _ort_runner(bundle: Bundle, variant: str, threads: int | None):
    from g2gserve.runtime.ort import ort_session
    _import("onnxruntime", "onnxruntime", "pip install 'g2gserve[serve]' (or install onnxruntime)")
    try:
        session = ort_session(bundle.onnx_source(variant), threads)
    except Exception as e:  # onnxruntime raises its own exception types for bad graphs
        raise ExportError(f"{bundle.directory}: onnxruntime cannot load the graph ({e})") from e
    return lambda x: session.run(None, {"input": np.asarray(x, np.float32)})[0]


def load(path: str | Path, backend: str = "torch", device: str = "cpu", variant: str = "sparse",
         threads: int | None = None) -> InferenceModel:
    """Load an export directory (validated) or a checkpoint (exported in memory)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose sparse or dense")
    if backend != "torch" and device not in ("cpu", "auto"):
        raise ValueError(f"the {backend} backend runs on the CPU; use backend torch for CUDA")
    if backend == "torch":
        torch = _import("torch", "torch", "pip install 'g2gserve[train]' (or install torch)")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda asked for but torch sees no CUDA device")
    bundle = open_bundle(path, onnx_graphs=(backend == "onnxruntime"))
    packed = densify(bundle.packed) if variant == "dense" else bundle.packed
    dev: Any = "cpu"
    if backend == "torch":
        run, dev = _torch_runner(packed, device)
    elif backend == "fused":
        run = _fused_runner(packed)
    else:
        run = _ort_runner(bundle, variant, threads)
    m = bundle.manifest
    return InferenceModel(run, Preprocess.from_dict(m.preprocess), list(m.classes), m.to_dict(), backend, dev, variant)


__all__ = ["load", "open_bundle", "softmax", "InferenceModel", "ExportError", "CheckpointError", "BACKENDS", "VARIANTS"]
