"""Write a checkpoint as an export bundle (layout and reading: ``g2gserve.bundle``), parity-gated, atomically.

An export is written only when every artifact matches the PyTorch model to ``PARITY_TOL`` (max abs
error on logits) at batch sizes 1, 7 and 64, and atomically: a failed export leaves nothing behind. Where real
training images are found, it also records static int8 activation scales (``export.calibration``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.numpy import save_file

from g2gserve.bundle import (DENSE_ONNX, EXPORT_FORMAT, EXPORT_VERSION, MANIFEST, MODEL_ONNX, WEIGHTS, Bundle,
                             ExportError, FileEntry, LayerEntry, Manifest, Parity, Source, TensorEntry, sha256,
                             weight_tensors)
from g2gserve.export.onnx_graph import DEFAULT_OPSET, build_onnx
from g2gserve.fileio import atomic_directory
from g2gserve.formats import PackedLayer, densify
from g2gserve.formats.packing import pack_model
from g2gserve.model.checkpoint import Checkpoint, load_model
from g2gserve.model.g2gnet import G2GNet
from g2gserve.runtime.ort import ort_session
from g2gserve.versions import versions

if TYPE_CHECKING:
    import onnx

PARITY_TOL = 1e-4
PARITY_BATCHES = (1, 7, 64)


# ------------------------------------------------------------------ building
@dataclass
class Artifacts:
    """Everything an export writes, in memory (``bundle`` carries the manifest, packed net and graphs)."""

    bundle: Bundle

    @property
    def packed(self):
        return self.bundle.packed

    @property
    def manifest(self) -> Manifest:
        return self.bundle.manifest

    @property
    def model_onnx(self) -> "onnx.ModelProto":
        return self.bundle.graphs[MODEL_ONNX]

    @property
    def dense_onnx(self) -> "onnx.ModelProto":
        return self.bundle.graphs[DENSE_ONNX]


def csr_bytes(layer: PackedLayer) -> int:
    """What CSR storage (int32 indices) of this layer's live weights takes, whatever format was chosen."""
    nnz = round(layer.density * layer.in_features * layer.out_features)
    return nnz * 8 + (layer.out_features + 1) * 4 + layer.out_features * 4


def _layer_entry(layer: PackedLayer) -> LayerEntry:
    return LayerEntry(layer.name, layer.format, layer.in_features, layer.out_features, layer.block_size, layer.density,
                      layer.stored_bytes, layer.dense_bytes, csr_bytes(layer), layer.reason,
                      "block gather + batched MatMul" if layer.format == "block" else "dense MatMul")


def build_artifacts(model: G2GNet, ckpt: Checkpoint, fmt: str = "auto", opset: int = DEFAULT_OPSET,
                    name: str = "g2gnet", onnx_graphs: bool = True) -> Artifacts:
    """Pack ``model`` and (``onnx_graphs``) build both ONNX graphs in memory (no parity check, nothing written)."""
    model = model.cpu().eval()
    packed = pack_model(model, fmt)
    tensors = weight_tensors(packed)
    stored = sum(t.nbytes for t in tensors.values())
    dense_bytes = sum(t.nbytes for t in weight_tensors(densify(packed)).values())
    manifest = Manifest(
        format=EXPORT_FORMAT, format_version=EXPORT_VERSION, name=name, config=ckpt.config.to_dict(),
        classes=list(ckpt.classes), preprocess=ckpt.preprocess.to_dict(), dataset=ckpt.meta.get("dataset"),
        test_acc=(ckpt.history[-1]["test_acc"] if ckpt.history else None),
        layers=[_layer_entry(l) for l in packed.layers],
        tensors={k: TensorEntry(list(v.shape), str(v.dtype)) for k, v in tensors.items()},
        sizes={"stored_weight_bytes": stored, "dense_weight_bytes": dense_bytes, "weight_ratio": stored / dense_bytes},
        unit_orders=[o.tolist() for o in packed.unit_orders], opset=opset,
        versions=versions("torch", *(("onnx", "onnxruntime") if onnx_graphs else ())))  # what was used
    graphs = {MODEL_ONNX: build_onnx(packed, opset, name), DENSE_ONNX: build_onnx(densify(packed), opset, name + "-dense")} \
        if onnx_graphs else {}
    return Artifacts(Bundle(manifest, packed, None, graphs))


# ------------------------------------------------------------------ parity
def parity_images(ckpt: Checkpoint, data_dir: str | Path | None = None, n: int = max(PARITY_BATCHES)) -> tuple[torch.Tensor, str]:
    """Real test images of the checkpoint's data set when they can be found (no download), else synthetic."""
    from g2gserve.data.datasets import DataError, load_split  # only when writing an export
    dataset = ckpt.meta.get("dataset")
    if dataset:
        try:
            test = load_split(dataset, "test", data_dir, download=False)
            if tuple(test.x.shape[1:]) == ckpt.preprocess.input_shape:
                idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:n]
                return test.x[idx], f"{dataset} test set ({n} images)"
        except DataError:
            pass
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, *ckpt.preprocess.input_shape), generator=gen, dtype=torch.uint8), \
        f"synthetic uniform images ({n}); pass --data-dir for real ones"


@torch.no_grad()
def check_parity(model: G2GNet, art: Artifacts, x: torch.Tensor) -> dict[str, dict[str, float]]:
    """Max abs error on logits of each artifact vs the PyTorch model, per batch size."""
    from g2gserve.runtime.torch_backend import PackedModule
    module = PackedModule(art.packed)
    runners = {
        "torch": lambda xb: module(xb).numpy(),
        "model.onnx": lambda xb, s=ort_session(art.model_onnx): s.run(None, {"input": xb.numpy()})[0],
        "dense.onnx": lambda xb, s=ort_session(art.dense_onnx): s.run(None, {"input": xb.numpy()})[0],
    }
    errors: dict[str, dict[str, float]] = {k: {} for k in runners}
    model = model.cpu().eval()
    for n in PARITY_BATCHES:
        xb = x[:n]
        ref = model(xb).numpy()
        for name, run in runners.items():
            errors[name][str(n)] = float(np.abs(run(xb) - ref).max())
    return errors


# ------------------------------------------------------------------ writing
def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, fmt: str = "auto", opset: int = DEFAULT_OPSET,
                      data_dir: str | Path | None = None, overwrite: bool = False) -> dict:
    """Write an export directory for ``checkpoint``; returns its manifest. Raises ExportError on disagreement."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    model, ckpt = load_model(checkpoint)
    art = build_artifacts(model, ckpt, fmt, opset, name=checkpoint.parent.name or checkpoint.stem)
    images, source = parity_images(ckpt, data_dir)
    errors = check_parity(model, art, ckpt.preprocess(images))
    worst = max(e for per in errors.values() for e in per.values())
    m = art.manifest
    m.parity = Parity(source, PARITY_TOL, errors, worst)
    if not worst <= PARITY_TOL:  # also catches NaN
        detail = "; ".join(f"{k} {max(v.values()):.2e}" for k, v in errors.items())
        raise ExportError(f"refusing to export {checkpoint}: artifacts disagree with the PyTorch model by more "
                          f"than {PARITY_TOL} ({detail})")
    m.source = Source(str(checkpoint), sha256(checkpoint))
    from g2gserve.export.calibration import calibrate
    m.calibration = calibrate(art.packed, ckpt.preprocess, ckpt.meta.get("dataset"), data_dir)
    import onnx
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        save_file(weight_tensors(art.packed), str(tmp / WEIGHTS), metadata={"format": EXPORT_FORMAT})
        onnx.save(art.model_onnx, str(tmp / MODEL_ONNX))
        onnx.save(art.dense_onnx, str(tmp / DENSE_ONNX))
        m.files = {f: FileEntry((tmp / f).stat().st_size, sha256(tmp / f)) for f in (WEIGHTS, MODEL_ONNX, DENSE_ONNX)}
        onnx_bytes, dense_bytes = m.files[MODEL_ONNX].bytes, m.files[DENSE_ONNX].bytes
        m.sizes |= {"model_onnx_bytes": onnx_bytes, "dense_onnx_bytes": dense_bytes, "onnx_ratio": onnx_bytes / dense_bytes}
        (tmp / MANIFEST).write_text(json.dumps(m.to_dict(), indent=1) + "\n")
    return m.to_dict()
