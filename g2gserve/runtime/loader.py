"""``load(MODEL)``: an inference model from an export directory or a ``model.pt``.

    model = load("runs/fmnist/export", backend="onnxruntime")
    probs = model.predict(images_uint8)        # (N, C, H, W) uint8 -> (N, classes) probabilities

The torch backend executes the compact formats directly (block gather + bmm, CSR) on CPU or CUDA;
the onnxruntime backend runs ``model.onnx``; the fused backend runs the whole network as one compiled
CPU function over the live tiles (numba; fastest at small batches, single-threaded); the triton backend
is the torch one with its block layers in one fused Triton kernel each (CUDA). ``variant="dense"``
loads the dense twin of the same function (``dense.onnx`` / dense tensors) for side-by-side comparisons.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from g2gserve.model.checkpoint import CheckpointError, load_model
from g2gserve.export import ExportError, build_artifacts, ort_session, read_export
from g2gserve.formats import densify
from g2gserve.data.preprocess import Preprocess
from g2gserve.runtime.cuda_graphs import GraphRunner
from g2gserve.runtime.precision import DTYPES, cast_runner, check_dtype
from g2gserve.runtime.torch_backend import PackedModule

BACKENDS = ("torch", "onnxruntime", "fused", "triton")
CPU_BACKENDS = ("torch", "onnxruntime", "fused")
VARIANTS = ("sparse", "dense")


class InferenceModel:
    """A loaded model: ``predict`` takes uint8 images, applies the training preprocessing, returns probabilities."""

    def __init__(self, run, preprocess: Preprocess, classes: list[str], manifest: dict, backend: str,
                 device: torch.device, variant: str, dtype: str = "fp32"):
        self._run = run
        self.preprocess, self.classes, self.manifest = preprocess, classes, manifest
        self.backend, self.device, self.variant, self.dtype = backend, device, variant, dtype

    @property
    def name(self) -> str:
        return self.manifest.get("name", "g2gnet")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.preprocess.input_shape

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for already-normalised float input (N, C, H, W)."""
        return self._run(x)

    def predict(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(N, C, H, W) uint8 images -> (N, classes) float probabilities on the CPU."""
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8:
            raise ValueError(f"predict expects uint8 images, got {images.dtype}")
        x = self.preprocess(images)
        return torch.softmax(self._run(x).float(), dim=1).cpu()


def _torch_runner(module: torch.nn.Module, device: torch.device, dtype: str = "fp32", max_batch: int | None = None,
                  input_shape: tuple[int, ...] = ()):
    """``module`` on ``device`` at ``dtype``; on CUDA with ``max_batch``, behind per-bucket CUDA graphs."""
    forward = cast_runner(module.to(device), dtype)
    if device.type == "cuda" and max_batch:
        forward = GraphRunner(forward, input_shape, device, max_batch)
        forward.capture_all()  # at load, so no request pays for a capture

    def run(x: torch.Tensor) -> torch.Tensor:
        return forward(x.to(device, torch.float32, non_blocking=True))
    return run


def _ort_runner(session):
    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"input": x.detach().cpu().numpy().astype(np.float32, copy=False)})[0])
    return run


def load(path: str | Path, backend: str = "torch", device: str = "cpu", variant: str = "sparse",
         threads: int | None = None, dtype: str = "fp32", max_batch: int | None = None) -> InferenceModel:
    """Load an export directory (validated) or a checkpoint (exported in memory).

    ``dtype`` (torch and triton backends): fp32, tf32, bf16 or fp16 (see ``runtime.precision``). With
    ``max_batch`` on CUDA, forward passes replay CUDA graphs captured per power-of-two batch bucket.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose sparse or dense")
    check_dtype(dtype)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() and backend in ("torch", "triton") else "cpu"
    if backend in ("onnxruntime", "fused") and device != "cpu":
        raise ValueError(f"the {backend} backend runs on the CPU; use backend torch or triton for CUDA")
    if backend in ("onnxruntime", "fused") and dtype != "fp32":
        raise ValueError(f"the {backend} backend computes in fp32; dtype {dtype} needs backend torch or triton")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda asked for but torch sees no CUDA device")
    path = Path(path)
    if path.is_dir():
        packed, manifest = read_export(path)
        onnx_source = path / ("model.onnx" if variant == "sparse" else "dense.onnx")
    elif path.is_file():
        model, ckpt = load_model(path)
        art = build_artifacts(model, ckpt, name=path.parent.name or path.stem)
        packed, manifest = art.packed, art.manifest
        onnx_source = art.model_onnx if variant == "sparse" else art.dense_onnx
    else:
        raise FileNotFoundError(f"{path}: no such export directory or checkpoint")
    if backend in ("torch", "triton"):
        net = densify(packed) if variant == "dense" else packed
        if backend == "triton":
            from g2gserve.runtime import triton_kernel  # imports triton: only for this backend
            from g2gserve.runtime.triton_backend import TritonModule
            if device != "cuda" and not triton_kernel.INTERPRETED:
                raise ValueError("the triton backend runs on CUDA (or on the CPU under TRITON_INTERPRET=1, for tests)")
            module = TritonModule(net)
        else:
            module = PackedModule(net)
        run = _torch_runner(module, torch.device(device), dtype, max_batch, tuple(packed.input_shape))
    elif backend == "fused":
        from g2gserve.runtime.fused import fused_runner  # imports numba (~60 MB): only for this backend
        run = fused_runner(densify(packed) if variant == "dense" else packed)
    else:
        try:
            run = _ort_runner(ort_session(onnx_source, threads))
        except Exception as e:  # onnxruntime raises its own exception types for bad graphs
            raise ExportError(f"{path}: onnxruntime cannot load the graph ({e})") from e
    return InferenceModel(run, Preprocess.from_dict(manifest["preprocess"]), list(manifest["classes"]), manifest,
                          backend, torch.device(device), variant, dtype)


__all__ = ["load", "InferenceModel", "ExportError", "CheckpointError", "BACKENDS", "CPU_BACKENDS", "DTYPES"]
