"""The export bundle: one directory, four files, a typed manifest. This module owns its layout and reading.

    DIR/manifest.json          ``Manifest``: config, classes, preprocessing, per-layer formats, unit orders,
                               sizes, parity, versions, and the size + sha256 of every other file
    DIR/weights.safetensors    the packed tensors (``weight_tensors`` names them), no pickle
    DIR/model.onnx             sparse-structured graph: only live tiles are stored and computed
    DIR/dense.onnx             the dense graph of the same function, the reference to compare against

``read_bundle`` validates everything before anything is used: the manifest's schema and version, that
``files`` lists every artifact by plain file name with a matching sha256, tensor shapes/dtypes and index
ranges (each format's ``validate``). Reading needs numpy and safetensors only (no torch, no onnx).
``g2gserve.export`` writes bundles; ``python -m g2gserve.bundle --schema docs/manifest.schema.json`` writes the
manifest's JSON Schema (``--check DIR`` validates a bundle).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

from g2gserve.data.preprocess import Preprocess
from g2gserve.formats import PackedLayer, PackedNet, format_of
from g2gserve.model.config import ModelConfig

EXPORT_FORMAT = "g2gserve.export"
# 2: ``files`` (size + sha256 of every artifact) is mandatory; ``unit_orders`` recorded. Version 1 bundles are
# refused with a message to re-export.
EXPORT_VERSION = 2
MANIFEST, WEIGHTS, MODEL_ONNX, DENSE_ONNX = "manifest.json", "weights.safetensors", "model.onnx", "dense.onnx"
FILES = (MANIFEST, WEIGHTS, MODEL_ONNX, DENSE_ONNX)
ARTIFACTS = FILES[1:]  # the files the manifest checksums


class ExportError(RuntimeError):
    """An export could not be written, or an export directory is missing, tampered or incompatible."""


# ------------------------------------------------------------------ the manifest schema
@dataclass
class LayerEntry:
    """One hidden layer: its storage format, why it was chosen, and what it stores."""

    name: str
    format: str
    in_features: int
    out_features: int
    block_size: int
    density: float
    stored_bytes: int
    dense_bytes: int
    csr_bytes: int
    reason: str
    onnx: str


@dataclass
class TensorEntry:
    shape: list[int]
    dtype: str


@dataclass
class FileEntry:
    bytes: int
    sha256: str


@dataclass
class Parity:
    """Max abs error on logits of each artifact vs the PyTorch model, per batch size."""

    inputs: str
    tolerance: float
    max_abs_error: dict[str, dict[str, float]]
    worst: float


@dataclass
class Source:
    checkpoint: str
    sha256: str


@dataclass
class PrecisionGate:
    """A reduced precision checked against fp32 on real test images (``g2gserve.runtime.precision``)."""

    dtype: str
    backend: str
    device: str
    inputs: str
    images: int
    top1_agreement: float
    max_prob_diff: float
    rule: str
    passed: bool


@dataclass
class Calibration:
    """Static activation scales for int8 serving (``g2gserve.export.calibration``): the output of the encoder and of
    each hidden layer (all a ReLU's, zero point 0) as uint8 at ``activation_scales[i]`` per step."""

    inputs: str
    images: int
    quantile: float
    activation_scales: list[float]


@dataclass
class Manifest:
    """``manifest.json``. ``parity``, ``source`` and ``files`` are null only for a bundle built in memory."""

    format: str
    format_version: int
    name: str
    config: dict[str, Any]       # ``ModelConfig.to_dict()``
    classes: list[str]
    preprocess: dict[str, Any]   # ``Preprocess.to_dict()``
    dataset: Union[str, None]
    test_acc: Union[float, None]
    layers: list[LayerEntry]
    tensors: dict[str, TensorEntry]
    sizes: dict[str, float]
    unit_orders: list[list[int]]  # per unit set (encoder output first): packed unit j is model unit order[j]
    opset: int
    versions: dict[str, str]
    parity: Union[Parity, None] = None
    source: Union[Source, None] = None
    files: Union[dict[str, FileEntry], None] = None
    precision: Union[dict[str, PrecisionGate], None] = None  # per dtype, recorded after the export
    calibration: Union[Calibration, None] = None  # null where the export found no real training images

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> "Manifest":
        """Checked against the schema; ValueError names the first field that does not fit."""
        return _parse(d, cls, "manifest")


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse(value: Any, tp: Any, where: str) -> Any:
    """``value`` (from JSON) as type ``tp``: dataclasses, list[X], dict[str, X], unions with None, scalars."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _parse(value, next(a for a in args if a is not type(None)), where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be an object")
        fields = {f.name: f for f in dataclasses.fields(tp)}
        unknown = set(value) - set(fields)
        if unknown:
            raise ValueError(f"{where} has unknown keys {sorted(unknown)}")
        hints, out = _hints(tp), {}
        for name, f in fields.items():
            if name not in value:
                if f.default is dataclasses.MISSING:
                    raise ValueError(f"{where} lacks {name!r}")
                continue
            out[name] = _parse(value[name], hints[name], f"{where}.{name}")
        return tp(**out)
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where} must be a list")
        return [_parse(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be an object")
        return {k: _parse(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    ok = {bool: lambda v: isinstance(v, bool), int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str)}[tp](value)
    if not ok:
        raise ValueError(f"{where} must be {tp.__name__}, got {type(value).__name__}")
    return float(value) if tp is float else value


def _schema(tp: Any, defs: dict) -> dict:
    """JSON Schema of a type understood by ``_parse``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return {"anyOf": [_schema(a, defs) for a in args]}
    if dataclasses.is_dataclass(tp):
        if tp.__name__ not in defs:
            defs[tp.__name__] = {}
            hints = _hints(tp)
            fields = dataclasses.fields(tp)
            defs[tp.__name__] = {
                "type": "object", "description": " ".join((tp.__doc__ or "").split()),
                "properties": {f.name: _schema(hints[f.name], defs) for f in fields},
                "required": [f.name for f in fields if f.default is dataclasses.MISSING],
                "additionalProperties": False}
        return {"$ref": f"#/$defs/{tp.__name__}"}
    if origin is list:
        return {"type": "array", "items": _schema(args[0], defs)}
    if origin is dict:
        return {"type": "object", "additionalProperties": _schema(args[1], defs)}
    if tp is Any:
        return {}
    return {bool: {"type": "boolean"}, int: {"type": "integer"}, float: {"type": "number"}, str: {"type": "string"},
            type(None): {"type": "null"}}[tp]


def json_schema() -> dict:
    """The JSON Schema (2020-12) of ``manifest.json``."""
    defs: dict = {}
    root = _schema(Manifest, defs)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "g2gserve export manifest",
            "description": f"manifest.json of a g2gserve export bundle, format version {EXPORT_VERSION}",
            **root, "$defs": defs}


# ------------------------------------------------------------------ weight naming
def weight_tensors(packed: PackedNet) -> dict[str, np.ndarray]:
    """The bundle's tensors by name: ``encoder.*``, ``head.*`` and ``<layer name>.<format tensor>``."""
    tensors = {"encoder.weight": packed.conv_weight, "encoder.bias": packed.conv_bias,
               "head.weight": packed.head_weight, "head.bias": packed.head_bias}
    for layer in packed.layers:
        tensors.update({f"{layer.name}.{k}": v for k, v in layer.tensors.items()})
    return {k: np.ascontiguousarray(v) for k, v in tensors.items()}


def packed_from_tensors(m: Manifest, tensors: dict[str, np.ndarray]) -> PackedNet:
    """The inverse of ``weight_tensors`` given the manifest, validated (ValueError/KeyError on any mismatch)."""
    cfg = ModelConfig.from_dict(m.config)
    Preprocess.from_dict(m.preprocess)
    if len(m.classes) != cfg.num_classes:
        raise ValueError(f"{len(m.classes)} class names for {cfg.num_classes} classes")
    p = cfg.patch_size
    conv_w, conv_b = tensors["encoder.weight"], tensors["encoder.bias"]
    if conv_w.shape != (cfg.conv_channels, cfg.in_channels, p, p) or conv_b.shape != (cfg.conv_channels,):
        raise ValueError(f"encoder weights have shape {conv_w.shape}, config expects {(cfg.conv_channels, cfg.in_channels, p, p)}")
    layers, width = [], cfg.encoder_features
    for e in m.layers:
        if e.in_features != width:
            raise ValueError(f"{e.name} takes {e.in_features} inputs, the previous layer gives {width}")
        spec = format_of(e.format)
        layer = PackedLayer(e.name, e.format, e.in_features, e.out_features,
                            {k: tensors[f"{e.name}.{k}"] for k in spec.tensor_names if f"{e.name}.{k}" in tensors},
                            e.density, e.block_size, e.reason)
        spec.validate(layer)
        layers.append(layer)
        width = e.out_features
    head_w, head_b = tensors["head.weight"], tensors["head.bias"]
    if head_w.shape != (cfg.num_classes, width) or head_b.shape != (cfg.num_classes,):
        raise ValueError(f"head has shape {head_w.shape}, expected {(cfg.num_classes, width)}")
    for t in (conv_w, conv_b, head_w, head_b):
        if t.dtype != np.float32:
            raise ValueError(f"encoder/head weights must be float32, got {t.dtype}")
    if m.calibration is not None:
        scales = np.asarray(m.calibration.activation_scales, np.float64)
        if scales.shape != (len(layers) + 1,) or not (np.isfinite(scales) & (scales > 0)).all():
            raise ValueError(f"calibration.activation_scales must be {len(layers) + 1} positive numbers (the encoder's "
                             f"and each hidden layer's outputs), got {m.calibration.activation_scales}")
    orders = [np.asarray(o, np.int64) for o in m.unit_orders]
    return PackedNet(cfg.in_channels, cfg.image_size, cfg.patch_size, cfg.num_classes, conv_w, conv_b, layers,
                     head_w, head_b, orders)


# ------------------------------------------------------------------ reading
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Bundle:
    """A validated export directory (or an in-memory one: ``directory`` None)."""

    manifest: Manifest
    packed: PackedNet
    directory: Path | None = None
    graphs: dict[str, Any] = field(default_factory=dict)  # in memory only: "model.onnx"/"dense.onnx" -> ModelProto

    def onnx_source(self, variant: str):
        """The ONNX graph of ``variant`` ("sparse" or "dense"): a file path, or a ModelProto in memory."""
        name = MODEL_ONNX if variant == "sparse" else DENSE_ONNX
        return self.directory / name if self.directory is not None else self.graphs[name]


def _fail(directory: Path, why: str) -> ExportError:
    return ExportError(f"{directory}: {why}")


def _check_files(directory: Path, files: Any) -> None:
    """``files`` must list every artifact by plain file name, and every listed file must match its sha256."""
    if files is None:
        raise _fail(directory, "manifest.json has no 'files' section (the checksums of the artifacts); re-export")
    if not isinstance(files, dict):
        raise _fail(directory, "manifest.json's 'files' must map file names to their size and sha256")
    for name in files:
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", "..") or "\\" in name:
            raise _fail(directory, f"manifest.json names {name!r}: only plain file names inside the export "
                                   f"directory are allowed")
        if name not in ARTIFACTS:
            raise _fail(directory, f"manifest.json lists {name!r}, which is not a file of an export "
                                   f"(expected {', '.join(ARTIFACTS)})")
    unlisted = [f for f in ARTIFACTS if f not in files]
    if unlisted:
        raise _fail(directory, f"manifest.json has no checksum for {', '.join(unlisted)}")
    for name, info in files.items():
        path = directory / name
        if path.is_symlink() or not path.is_file():
            raise _fail(directory, f"{name} is not a regular file")
        digest = info.get("sha256") if isinstance(info, dict) else None
        if not isinstance(digest, str) or sha256(path) != digest:
            raise _fail(directory, f"{name} does not match the checksum in manifest.json (modified after export?)")


def read_bundle(directory: str | Path) -> Bundle:
    """Load and fully validate an export directory; any problem is an ExportError naming the directory."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    directory = Path(directory)
    if not directory.is_dir():
        raise _fail(directory, "no such export directory")
    missing = [f for f in FILES if not (directory / f).is_file()]
    if missing:
        raise _fail(directory, f"incomplete export, missing {', '.join(missing)}")
    try:
        raw = json.loads((directory / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(directory, f"manifest.json is not valid JSON ({e})") from e
    if not isinstance(raw, dict) or raw.get("format") != EXPORT_FORMAT:
        raise _fail(directory, "manifest.json is not a g2gserve export manifest")
    if raw.get("format_version") != EXPORT_VERSION:
        raise _fail(directory, f"export format version {raw.get('format_version')} is not supported "
                               f"(this g2gserve reads version {EXPORT_VERSION}); re-export with g2g-export")
    _check_files(directory, raw.get("files"))
    try:
        manifest = Manifest.from_dict(raw)
    except ValueError as e:
        raise _fail(directory, f"manifest.json does not fit the schema: {e}") from e
    try:
        tensors = load_file(str(directory / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise _fail(directory, f"weights.safetensors is unreadable ({e})") from e
    try:
        packed = packed_from_tensors(manifest, tensors)
    except KeyError as e:
        raise _fail(directory, f"missing tensor or entry {e}") from e
    except (ValueError, TypeError) as e:
        raise _fail(directory, str(e)) from e
    return Bundle(manifest, packed, directory)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m g2gserve.bundle", description="Export bundle tools.")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--schema", nargs="?", const="-", metavar="PATH",
                   help="write the JSON Schema of manifest.json to PATH (docs/manifest.schema.json), or print it")
    g.add_argument("--check", type=Path, metavar="DIR", help="validate an export directory")
    args = p.parse_args(argv)
    if args.schema:
        text = json.dumps(json_schema(), indent=1) + "\n"
        if args.schema == "-":
            print(text, end="")
        else:
            from g2gserve.fileio import atomic_write_text
            atomic_write_text(args.schema, text)
        return 0
    try:
        b = read_bundle(args.check)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.check}: valid g2gserve export (format version {EXPORT_VERSION}, "
          f"{len(b.packed.layers)} hidden layers: {', '.join(l.format for l in b.packed.layers)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
