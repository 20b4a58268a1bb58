"""Precision as a runtime option (``fp32 | tf32 | bf16 | fp16``; the fused CPU backend's ``fp32 | bf16 | int8 |
int8-static``) and the accuracy gate that admits it.

fp32 is the reference (the export's parity gate holds it to 1e-4 of PyTorch). ``tf32`` keeps fp32 weights
and activations but lets matmuls use TF32 tensor cores (10-bit mantissa inputs); ``bf16``/``fp16`` store
weights and activations in 16 bits (fp32 accumulation on the GPU). Reduced precision is admitted only where
the gate holds on *real* test images: top-1 agreement with fp32 >= 99.5%, and it reports the largest
probability difference. ``python -m g2gserve.runtime.precision EXPORT --dtype tf32,bf16 --record`` runs the gate
and records each result in the export's manifest (``manifest["precision"][dtype]``).

Importing this module needs no torch (the loader reads ``DTYPES`` in a serving install without it).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn

DTYPES = ("fp32", "tf32", "bf16", "fp16")  # torch and triton backends
# fused (CPU) backend: runtime.fused.PRECISIONS (not imported here: numba), and int8 at the activation scales
# calibrated at export (export.calibration)
FUSED_DTYPES = ("fp32", "bf16", "int8", "int8-static")
ALL_DTYPES = tuple(dict.fromkeys(DTYPES + FUSED_DTYPES))


def dtypes_for(backend: str) -> tuple[str, ...]:
    """The precisions ``backend`` computes in (onnxruntime: fp32 only)."""
    return DTYPES if backend in ("torch", "triton") else FUSED_DTYPES if backend == "fused" else ("fp32",)


STORAGE = {"fp32": "float32", "tf32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # torch dtype names
MIN_TOP1_AGREEMENT = 0.995
GATE_IMAGES = 10_000  # the whole Fashion-MNIST / CIFAR test set


def check_dtype(dtype: str, backend: str = "torch") -> str:
    allowed = dtypes_for(backend)
    if dtype not in allowed:
        raise ValueError(f"unknown dtype {dtype!r}{' for the fused backend' if backend == 'fused' else ''}; "
                         f"choose one of {', '.join(allowed)}")
    return dtype


def torch_dtype(dtype: str) -> "torch.dtype":
    """The torch dtype weights and activations are stored in at ``dtype``."""
    import torch
    return getattr(torch, STORAGE[check_dtype(dtype)])


def allows_tf32() -> bool:
    """Whether fp32 matmuls may use TF32 now; ``matmul_precision`` sets it for torch and the Triton kernel alike."""
    import torch
    return torch.backends.cuda.matmul.allow_tf32


@contextlib.contextmanager
def matmul_precision(dtype: str) -> Iterator[None]:
    """fp32 matmuls in TF32 (``tf32``) or IEEE fp32 (everything else) inside the block, restored after.

    A CUDA graph captured inside keeps the kernels chosen then, so graphs need it only while capturing.
    The ``allow_tf32`` switch sets torch's legacy and new precision settings together; setting only the new
    ``fp32_precision`` leaves them disagreeing, and cuBLAS then refuses to run (torch 2.9+).
    """
    import torch
    setting = torch.backends.cuda.matmul
    before = setting.allow_tf32
    setting.allow_tf32 = dtype == "tf32"
    try:
        yield
    finally:
        setting.allow_tf32 = before


def cast_runner(module: "nn.Module", dtype: str) -> Callable[["torch.Tensor"], "torch.Tensor"]:
    """``module`` (already on its device) converted to ``dtype`` in place: float32 input in, float32 logits out.
    A module with ``casts_input`` set converts its float32 input itself (the triton backend's encoder, in
    registers), so it is given the input as it is."""
    import torch
    compute = torch_dtype(dtype)
    module = module.to(compute)
    cast = not getattr(module, "casts_input", False)

    @torch.inference_mode()
    def run(x: "torch.Tensor") -> "torch.Tensor":
        with matmul_precision(dtype):
            return module(x.to(compute) if cast else x.float()).float()
    return run


def agreement(reference: np.ndarray, candidate: np.ndarray, dtype: str) -> dict:
    """The gate on two (N, classes) probability arrays: top-1 agreement and the largest probability difference.

    fp32 must match to the export's parity tolerance; reduced precision must agree on >= 99.5% of top-1s.
    """
    from g2gserve.export.writer import PARITY_TOL  # the export's own fp32 tolerance

    reference, candidate = np.asarray(reference, np.float32), np.asarray(candidate, np.float32)
    if reference.shape != candidate.shape or reference.ndim != 2 or len(reference) == 0:
        raise ValueError(f"need two non-empty (N, classes) arrays of one shape, got {reference.shape} and "
                         f"{candidate.shape}")
    top1 = float(np.mean(reference.argmax(1) == candidate.argmax(1)))
    diff = float(np.abs(reference - candidate).max())
    finite = bool(np.isfinite(candidate).all())
    passed = finite and (diff <= PARITY_TOL if dtype == "fp32" else top1 >= MIN_TOP1_AGREEMENT)
    rule = (f"max probability difference <= {PARITY_TOL}" if dtype == "fp32"
            else f"top-1 agreement with fp32 >= {MIN_TOP1_AGREEMENT:.1%}")
    return {"images": len(reference), "top1_agreement": top1, "max_prob_diff": diff, "rule": rule, "passed": passed}


def real_test_images(manifest: dict, data_dir: str | Path | None, limit: int = GATE_IMAGES) -> tuple[np.ndarray, str]:
    """The first ``limit`` real test images of the model's data set (never downloaded; the gate needs real ones)."""
    from g2gserve.data.datasets import DataError, load_split

    dataset = manifest.get("dataset")
    if not dataset:
        raise ValueError("the manifest names no data set, so there are no real test images to gate on")
    try:
        test = load_split(dataset, "test", data_dir, download=False)
    except DataError as e:
        raise ValueError(f"the precision gate needs the real {dataset} test set: {e}") from e
    x = np.asarray(test.x[:limit])
    return x, f"{dataset} test set ({len(x)} images)"


def probabilities(model, images: np.ndarray, batch: int = 1024) -> np.ndarray:
    return np.concatenate([np.asarray(model.predict(images[i:i + batch]), np.float32)
                           for i in range(0, len(images), batch)])


def precision_gate(path: str | Path, dtype: str, backend: str = "torch", device: str = "cpu",
                   data_dir: str | Path | None = None, limit: int = GATE_IMAGES) -> dict:
    """Run the export at ``dtype`` on ``backend``/``device`` against the fp32 torch model on the CPU, on real
    test images; returns what was checked, for the manifest."""
    from g2gserve.runtime.loader import load

    check_dtype(dtype, backend)
    candidate = load(path, backend=backend, device=device, dtype=dtype)
    reference = load(path, backend="torch", device="cpu")
    images, source = real_test_images(candidate.manifest, data_dir, limit)
    result = agreement(probabilities(reference, images), probabilities(candidate, images), dtype)
    return {"dtype": dtype, "backend": backend, "device": device, "inputs": source, **result}


def record(path: str | Path, result: dict) -> None:
    """Store a gate result in the export's manifest (atomically; other keys untouched)."""
    from g2gserve.fileio import atomic_write_text

    from g2gserve.bundle import Manifest

    manifest_path = Path(path) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["precision"] = (manifest.get("precision") or {}) | {result["dtype"]: result}
    Manifest.from_dict(manifest)  # never write a manifest the bundle reader would refuse
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1) + "\n")


def gate_all(path: str | Path, dtypes: list[str], backend: str = "torch", device: str = "cpu",
             data_dir: str | Path | None = None, limit: int = GATE_IMAGES, save: bool = False) -> list[dict]:
    """``precision_gate`` for each dtype; with ``save``, each result is recorded in the export's manifest."""
    results = [precision_gate(path, d, backend, device, data_dir, limit) for d in dtypes]
    if save:
        for result in results:
            record(path, result)
    return results


def parse_dtypes(text: str, backend: str = "torch") -> list[str]:
    """``"tf32,bf16"`` -> ["tf32", "bf16"], each checked for ``backend``."""
    return [check_dtype(d, backend) for d in text.split(",") if d]


def markdown(results: list[dict]) -> str:
    lines = ["| precision | backend | device | inputs | top-1 agreement with fp32 | max probability difference "
             "| rule | passed |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['dtype']} | {r['backend']} | {r['device']} | {r['inputs']} | {r['top1_agreement']:.2%} | "
              f"{r['max_prob_diff']:.2e} | {r['rule']} | {'yes' if r['passed'] else '**no**'} |" for r in results]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m g2gserve.runtime.precision",
                                description="Accuracy gate for reduced precision: top-1 agreement with fp32 on the "
                                            "real test set (>= 99.5%) and the largest probability difference.")
    p.add_argument("model", type=Path, help="export directory")
    p.add_argument("--dtype", required=True, help=f"comma-separated, from {', '.join(DTYPES)} (torch, triton) or "
                                                  f"{', '.join(FUSED_DTYPES)} (fused)")
    p.add_argument("--backend", choices=("torch", "triton", "fused"), default="torch",
                   help="fused: the CPU kernel (int8 needs AVX512-VNNI; int8-static the export's calibration)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--data-dir", type=Path, default=None, help="where the test set is (idx files or test.npz)")
    p.add_argument("--limit", type=int, default=GATE_IMAGES, help="test images at most")
    p.add_argument("--record", action="store_true", help="write the results into MODEL/manifest.json")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON and a markdown table "
                                                          "(OUT.json, OUT.md)")
    args = p.parse_args(argv)
    if not args.model.is_dir():
        p.error(f"{args.model}: not an export directory")
    try:
        dtypes = parse_dtypes(args.dtype, args.backend)
    except ValueError as e:
        p.error(str(e))
    if not dtypes:
        p.error("--dtype: name at least one")
    try:
        results = gate_all(args.model, dtypes, args.backend, args.device, args.data_dir, args.limit, args.record)
    except ValueError as e:
        print(f"precision gate: error: {e}", file=sys.stderr)
        return 2
    if args.out is not None:
        from g2gserve.fileio import atomic_write_text
        atomic_write_text(args.out.with_suffix(".json"), json.dumps(results, indent=1) + "\n")
        atomic_write_text(args.out.with_suffix(".md"), markdown(results))
    print(markdown(results))
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
