"""g2g-export MODEL.pt: write compact weights and ONNX graphs, checked against PyTorch, atomically."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from g2gserve.model.checkpoint import CheckpointError
from g2gserve.export import ExportError, export_checkpoint
from g2gserve.formats.packing import FORMAT_CHOICES
from g2gserve.export.onnx_graph import DEFAULT_OPSET, MIN_OPSET
from g2gserve.runtime.precision import gate_all, parse_dtypes
from g2gserve.runtime.precision import markdown as precision_markdown


def size_table(m: dict) -> str:
    s = m["sizes"]
    lines = [f"{'layer':<10} {'format':<7} {'density':>8} {'dense bytes':>12} {'stored bytes':>13} {'ratio':>6}  why"]
    for l in m["layers"]:
        lines.append(f"{l['name']:<10} {l['format']:<7} {l['density']:>8.4f} {l['dense_bytes']:>12,} "
                     f"{l['stored_bytes']:>13,} {l['stored_bytes'] / l['dense_bytes']:>6.3f}  {l['reason']}")
    lines += [
        "",
        f"weights     stored {s['stored_weight_bytes']:>12,} B   dense {s['dense_weight_bytes']:>12,} B   "
        f"ratio {s['weight_ratio']:.3f}x",
        f"ONNX        model  {s['model_onnx_bytes']:>12,} B   dense {s['dense_onnx_bytes']:>12,} B   "
        f"ratio {s['onnx_ratio']:.3f}x",
    ]
    unstructured = [l for l in m["layers"] if l["format"] != "block" and l["density"] < 1.0]
    if unstructured:
        csr = sum(l["csr_bytes"] for l in unstructured)
        dense = sum(l["dense_bytes"] for l in unstructured)
        lines.append(f"CSR         {', '.join(l['name'] for l in unstructured)} as CSR would store {csr:,} B of "
                     f"{dense:,} B dense ({csr / dense:.3f}x; int32 indices double the bytes per live weight)")
    p = m["parity"]
    lines.append(f"parity      max abs error vs PyTorch on {p['inputs']}: "
                 + ", ".join(f"{k} {max(v.values()):.1e}" for k, v in p["max_abs_error"].items())
                 + f" (limit {p['tolerance']:g}, batches {', '.join(next(iter(p['max_abs_error'].values())))})")
    c = m.get("calibration")
    lines.append(f"int8 scales calibrated on {c['inputs']} ({c['quantile']:g}th percentile of each layer's outputs)"
                 if c else "int8 scales not calibrated (no real training images found; pass --data-dir): "
                           "dtype int8-static is unavailable, int8 (per-row) works")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="g2g-export",
        description="Export a trained G2GNet checkpoint as compact block-sparse / CSR / dense weights "
                    "(safetensors) plus two ONNX graphs: model.onnx (sparse-structured) and dense.onnx "
                    "(the dense reference). Nothing is written unless every artifact matches the PyTorch "
                    "model to 1e-4 on real inputs at batch sizes 1, 7 and 64.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="model.pt written by python -m training.fit")
    p.add_argument("--out", type=Path, default=None, help="export directory (default: export/ next to the checkpoint)")
    p.add_argument("--format", choices=FORMAT_CHOICES, default="auto",
                   help="storage of hidden layers; auto picks per layer (block for tiled masks, CSR only where it "
                        "beats dense, else dense) and records why in manifest.json")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (>= {MIN_OPSET})")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="where the model's data set is: real test images for the parity check, and training images "
                        "to calibrate static int8 activation scales (default: the Debian package, else synthetic "
                        "parity images and no calibration)")
    p.add_argument("--force", action="store_true", help="replace an existing export directory")
    p.add_argument("--dtype", default="", metavar="LIST",
                   help="also gate these precisions (e.g. tf32,bf16,fp16: top-1 agreement with fp32 >= 99.5%% on the "
                        "real test set, needs --data-dir or the Debian package) and record each in manifest.json; "
                        "exits 1 if one fails (the fp32 export stays written)")
    p.add_argument("--dtype-device", choices=("cpu", "cuda"), default="cpu",
                   help="where --dtype is gated: cpu (torch backend) or cuda (triton backend)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.opset < MIN_OPSET:
        parser.error(f"--opset {args.opset} is too old; use {MIN_OPSET} or newer")
    out = args.out or args.checkpoint.parent / "export"
    try:
        dtypes = parse_dtypes(args.dtype)
    except ValueError as e:
        parser.error(str(e))
    if out.exists() and not args.force:
        parser.error(f"{out} already exists; pass --force to replace it")
    try:
        manifest = export_checkpoint(args.checkpoint, out, args.format, args.opset, args.data_dir, overwrite=args.force)
    except (CheckpointError, ExportError, ValueError) as e:
        print(f"g2g-export: error: {e}", file=sys.stderr)
        return 1
    print(size_table(manifest))
    print(f"\nwrote {out}/ (manifest.json, weights.safetensors, model.onnx, dense.onnx)")
    if dtypes:
        backend = "triton" if args.dtype_device == "cuda" else "torch"
        try:
            results = gate_all(out, dtypes, backend, args.dtype_device, args.data_dir, save=True)
        except ValueError as e:
            print(f"g2g-export: error: precision gate: {e}", file=sys.stderr)
            return 1
        print("\n" + precision_markdown(results))
        if not all(r["passed"] for r in results):
            print("g2g-export: error: a precision failed its gate (recorded in manifest.json)", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
