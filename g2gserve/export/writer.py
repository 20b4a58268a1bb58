"""Export a checkpoint as a self-describing directory, and read such a directory back safely.

    DIR/manifest.json          config, classes, preprocessing, per-layer formats, sizes, parity, versions
    DIR/weights.safetensors    the packed tensors (no pickle)
    DIR/model.onnx             sparse-structured graph: only live tiles are stored and computed
    DIR/dense.onnx             the dense graph of the same function, the reference to compare against

An export is written only when every artifact matches the PyTorch model to ``PARITY_TOL`` (max abs
error on logits) at batch sizes 1, 7 and 64, and atomically: a failed export leaves nothing behind.
"""
from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from g2gserve import __version__
from g2gserve.model.checkpoint import Checkpoint, load_model
from g2gserve.model.config import ModelConfig
from g2gserve.data.datasets import DataError, load_split
from g2gserve.fileio import atomic_directory
from g2gserve.formats import PackedLayer, PackedNet, densify, pack_model
from g2gserve.model.g2gnet import G2GNet
from g2gserve.export.onnx_graph import DEFAULT_OPSET, build_onnx
from g2gserve.data.preprocess import Preprocess

EXPORT_FORMAT = "g2gserve.export"
EXPORT_VERSION = 1
PARITY_TOL = 1e-4
PARITY_BATCHES = (1, 7, 64)
FILES = ("manifest.json", "weights.safetensors", "model.onnx", "dense.onnx")


class ExportError(RuntimeError):
    """An export could not be written, or an export directory is missing, tampered or incompatible."""


def versions() -> dict[str, str]:
    import onnxruntime
    return {"g2gserve": __version__, "torch": str(torch.__version__), "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


# ------------------------------------------------------------------ building
@dataclass
class Artifacts:
    packed: PackedNet
    model_onnx: onnx.ModelProto
    dense_onnx: onnx.ModelProto
    manifest: dict


def weight_tensors(packed: PackedNet) -> dict[str, torch.Tensor]:
    tensors = {"encoder.weight": packed.conv_weight, "encoder.bias": packed.conv_bias,
               "head.weight": packed.head_weight, "head.bias": packed.head_bias}
    for layer in packed.layers:
        tensors.update({f"{layer.name}.{k}": v for k, v in layer.tensors.items()})
    return {k: v.contiguous() for k, v in tensors.items()}


def _layer_entry(layer: PackedLayer) -> dict:
    return {"name": layer.name, "format": layer.format, "in_features": layer.in_features,
            "out_features": layer.out_features, "block_size": layer.block_size, "density": layer.density,
            "stored_bytes": layer.stored_bytes, "dense_bytes": layer.dense_bytes, "reason": layer.reason,
            "onnx": "block gather + batched MatMul" if layer.format == "block" else "dense MatMul",
            "csr_bytes": csr_bytes(layer)}


def csr_bytes(layer: PackedLayer) -> int:
    """What CSR storage (int32 indices) of this layer's live weights takes, whatever format was chosen."""
    nnz = round(layer.density * layer.in_features * layer.out_features)
    return nnz * 8 + (layer.out_features + 1) * 4 + layer.out_features * 4


def build_artifacts(model: G2GNet, ckpt: Checkpoint, fmt: str = "auto", opset: int = DEFAULT_OPSET,
                    name: str = "g2gnet") -> Artifacts:
    """Pack ``model`` and build both ONNX graphs in memory (no parity check, nothing written)."""
    model = model.cpu().eval()
    packed = pack_model(model, fmt)
    dense = densify(packed)
    tensors = weight_tensors(packed)
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    dense_bytes = sum(t.numel() * t.element_size() for t in weight_tensors(dense).values())
    manifest = {
        "format": EXPORT_FORMAT, "format_version": EXPORT_VERSION, "name": name,
        "config": ckpt.config.to_dict(), "classes": list(ckpt.classes), "preprocess": ckpt.preprocess.to_dict(),
        "dataset": ckpt.meta.get("dataset"), "test_acc": (ckpt.history[-1]["test_acc"] if ckpt.history else None),
        "layers": [_layer_entry(l) for l in packed.layers],
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in tensors.items()},
        "sizes": {"stored_weight_bytes": stored, "dense_weight_bytes": dense_bytes, "weight_ratio": stored / dense_bytes},
        "opset": opset, "versions": versions(),
    }
    return Artifacts(packed, build_onnx(packed, opset, name), build_onnx(dense, opset, name + "-dense"), manifest)


# ------------------------------------------------------------------ parity
def parity_images(ckpt: Checkpoint, data_dir: str | Path | None = None, n: int = max(PARITY_BATCHES)) -> tuple[torch.Tensor, str]:
    """Real test images of the checkpoint's data set when they can be found (no download), else synthetic."""
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


def ort_session(model: onnx.ModelProto | str | Path, threads: int | None = None, profile_prefix: str | None = None):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    if profile_prefix:
        opts.enable_profiling, opts.profile_file_prefix = True, profile_prefix
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


@torch.no_grad()
def check_parity(model: G2GNet, art: Artifacts, x: torch.Tensor) -> dict[str, dict[str, float]]:
    """Max abs error on logits of each artifact vs the PyTorch model, per batch size."""
    from g2gserve.runtime.torch_backend import PackedModule  # here: the runtime package imports this module
    runners = {
        "torch": PackedModule(art.packed),
        "model.onnx": ort_session(art.model_onnx),
        "dense.onnx": ort_session(art.dense_onnx),
    }
    errors: dict[str, dict[str, float]] = {k: {} for k in runners}
    model = model.cpu().eval()
    for n in PARITY_BATCHES:
        xb = x[:n]
        ref = model(xb).numpy()
        for name, run in runners.items():
            out = run(xb).numpy() if name == "torch" else run.run(None, {"input": xb.numpy()})[0]
            errors[name][str(n)] = float(np.abs(out - ref).max())
    return errors


# ------------------------------------------------------------------ writing
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, fmt: str = "auto", opset: int = DEFAULT_OPSET,
                      data_dir: str | Path | None = None, overwrite: bool = False) -> dict:
    """Write an export directory for ``checkpoint``; returns its manifest. Raises ExportError on disagreement."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    model, ckpt = load_model(checkpoint)
    art = build_artifacts(model, ckpt, fmt, opset, name=checkpoint.parent.name or checkpoint.stem)
    images, source = parity_images(ckpt, data_dir)
    errors = check_parity(model, art, ckpt.preprocess(images))
    worst = max(e for per in errors.values() for e in per.values())
    art.manifest["parity"] = {"inputs": source, "tolerance": PARITY_TOL, "max_abs_error": errors, "worst": worst}
    if not worst <= PARITY_TOL:  # also catches NaN
        detail = "; ".join(f"{k} {max(v.values()):.2e}" for k, v in errors.items())
        raise ExportError(f"refusing to export {checkpoint}: artifacts disagree with the PyTorch model by more "
                          f"than {PARITY_TOL} ({detail})")
    art.manifest["source"] = {"checkpoint": str(checkpoint), "sha256": _sha256(checkpoint)}
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        save_file(weight_tensors(art.packed), str(tmp / "weights.safetensors"), metadata={"format": EXPORT_FORMAT})
        onnx.save(art.model_onnx, str(tmp / "model.onnx"))
        onnx.save(art.dense_onnx, str(tmp / "dense.onnx"))
        files = {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in FILES[1:]}
        art.manifest["files"] = files
        onnx_bytes, dense_bytes = files["model.onnx"]["bytes"], files["dense.onnx"]["bytes"]
        art.manifest["sizes"] |= {"model_onnx_bytes": onnx_bytes, "dense_onnx_bytes": dense_bytes,
                                  "onnx_ratio": onnx_bytes / dense_bytes}
        (tmp / "manifest.json").write_text(json.dumps(art.manifest, indent=1) + "\n")
    return art.manifest


# ------------------------------------------------------------------ reading
def _fail(directory: Path, why: str) -> ExportError:
    return ExportError(f"{directory}: {why}")


def _expected_shapes(entry: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    n_in, n_out, fmt = entry["in_features"], entry["out_features"], entry["format"]
    if fmt == "dense":
        return {"weight": ((n_out, n_in), torch.float32), "bias": ((n_out,), torch.float32)}
    if fmt == "block":
        b = entry["block_size"]
        if b < 1 or n_in % b or n_out % b:
            raise ValueError(f"block size {b} does not tile {n_out}x{n_in}")
        return {"bias": ((n_out,), torch.float32)}  # blocks/idx depend on K, checked below
    if fmt == "csr":
        return {"crow": ((n_out + 1,), torch.int32), "bias": ((n_out,), torch.float32)}
    raise ValueError(f"unknown layer format {fmt!r}")


def _validate_layer(entry: dict, t: dict[str, torch.Tensor]) -> None:
    for k, (shape, dtype) in _expected_shapes(entry).items():
        if k not in t:
            raise ValueError(f"missing tensor {entry['name']}.{k}")
        if tuple(t[k].shape) != shape or t[k].dtype != dtype:
            raise ValueError(f"{entry['name']}.{k} is {t[k].dtype} {tuple(t[k].shape)}, expected {dtype} {shape}")
    n_in, n_out = entry["in_features"], entry["out_features"]
    if entry["format"] == "block":
        b = entry["block_size"]
        idx, blocks = t.get("idx"), t.get("blocks")
        if idx is None or blocks is None:
            raise ValueError(f"{entry['name']}: block layer needs 'idx' and 'blocks'")
        k = idx.shape[1] if idx.dim() == 2 else -1
        if idx.dtype != torch.int64 or tuple(idx.shape) != (n_out // b, k) or k < 1:
            raise ValueError(f"{entry['name']}.idx is {idx.dtype} {tuple(idx.shape)}, expected int64 ({n_out // b}, K)")
        if tuple(blocks.shape) != (n_out // b, k * b, b) or blocks.dtype != torch.float32:
            raise ValueError(f"{entry['name']}.blocks has shape {tuple(blocks.shape)}, expected {(n_out // b, k * b, b)}")
        if int(idx.min()) < 0 or int(idx.max()) >= n_in // b:
            raise ValueError(f"{entry['name']}.idx has tile indices outside [0, {n_in // b})")
    elif entry["format"] == "csr":
        crow, col, values = t["crow"], t.get("col"), t.get("values")
        if col is None or values is None:
            raise ValueError(f"{entry['name']}: csr layer needs 'col' and 'values'")
        nnz = int(crow[-1])
        if int(crow[0]) != 0 or bool((crow[1:] < crow[:-1]).any()) or col.shape != (nnz,) or values.shape != (nnz,):
            raise ValueError(f"{entry['name']}: inconsistent CSR row pointers / lengths")
        if col.dtype != torch.int32 or values.dtype != torch.float32:
            raise ValueError(f"{entry['name']}: CSR needs int32 columns and float32 values")
        if nnz and (int(col.min()) < 0 or int(col.max()) >= n_in):
            raise ValueError(f"{entry['name']}.col has column indices outside [0, {n_in})")


def read_export(directory: str | Path) -> tuple[PackedNet, dict]:
    """Load and fully validate an export directory; any problem is an ExportError naming the directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise _fail(directory, "no such export directory")
    missing = [f for f in FILES if not (directory / f).is_file()]
    if missing:
        raise _fail(directory, f"incomplete export, missing {', '.join(missing)}")
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(directory, f"manifest.json is not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        raise _fail(directory, "manifest.json is not a g2gserve export manifest")
    if manifest.get("format_version") != EXPORT_VERSION:
        raise _fail(directory, f"export format version {manifest.get('format_version')} is not supported "
                               f"(this g2gserve reads version {EXPORT_VERSION}); re-export with g2g-export")
    for name, info in manifest.get("files", {}).items():
        if name not in FILES[1:] or _sha256(directory / name) != info.get("sha256"):
            raise _fail(directory, f"{name} does not match the checksum in manifest.json (modified after export?)")
    try:
        tensors = load_file(str(directory / "weights.safetensors"))
    except (SafetensorError, OSError, ValueError) as e:
        raise _fail(directory, f"weights.safetensors is unreadable ({e})") from e
    try:
        cfg = ModelConfig.from_dict(manifest["config"])
        Preprocess.from_dict(manifest["preprocess"])
        if len(manifest["classes"]) != cfg.num_classes:
            raise ValueError(f"{len(manifest['classes'])} class names for {cfg.num_classes} classes")
        conv_w, conv_b = tensors["encoder.weight"], tensors["encoder.bias"]
        p = cfg.patch_size
        if tuple(conv_w.shape) != (cfg.conv_channels, cfg.in_channels, p, p) or tuple(conv_b.shape) != (cfg.conv_channels,):
            raise ValueError(f"encoder weights have shape {tuple(conv_w.shape)}, config expects "
                             f"{(cfg.conv_channels, cfg.in_channels, p, p)}")
        layers, width = [], cfg.encoder_features
        for entry in manifest["layers"]:
            t = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(entry["name"] + ".")}
            if entry["in_features"] != width:
                raise ValueError(f"{entry['name']} takes {entry['in_features']} inputs, the previous layer gives {width}")
            _validate_layer(entry, t)
            layers.append(PackedLayer(entry["name"], entry["format"], entry["in_features"], entry["out_features"], t,
                                      float(entry["density"]), int(entry["block_size"]), entry.get("reason", "")))
            width = entry["out_features"]
        head_w, head_b = tensors["head.weight"], tensors["head.bias"]
        if tuple(head_w.shape) != (cfg.num_classes, width) or tuple(head_b.shape) != (cfg.num_classes,):
            raise ValueError(f"head has shape {tuple(head_w.shape)}, expected {(cfg.num_classes, width)}")
    except KeyError as e:
        raise _fail(directory, f"missing entry {e}") from e
    except (ValueError, TypeError) as e:
        raise _fail(directory, str(e)) from e
    packed = PackedNet(cfg.in_channels, cfg.image_size, cfg.patch_size, cfg.num_classes, conv_w, conv_b, layers,
                       head_w, head_b)
    return packed, manifest
