"""Launch settings of the Triton block-sparse kernel, measured: rows per program, warps, pipeline stages, and
whether programs compute the transposed tile (``swap``: batch rows on the MMA's wide side).

    python -m g2gserve.bench.triton_tune --write      # on a GPU (18 settings took ~2 minutes on an H200; now 24)

For each precision (tf32, bf16) every setting runs on the layers where the kernel's time matters (a 1024-unit
layer of the default model and an 8192-unit layer, 64x64 tiles, 25% live, at large batches), CUDA events
(``triton.testing.do_bench``, median); the dense layer at the same precision (cuBLAS ``addmm`` + ReLU) runs
beside it for scale. The best setting is the one with the smallest geometric mean of its time over the best
time per layer. ``--write`` stores the choice (machine and command named) as
``g2gserve/runtime/triton_tuned.json``, which ``triton_kernel.launch_config`` reads; ``--out`` writes every
measurement as well (``docs/benchmarks/gpu/triton-tune.json``).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import torch

from g2gserve.fileio import atomic_write_text

ROWS = (64, 128, 256)
WARPS = (4, 8)
STAGES = (2, 3)  # 4 never won on the H200 (docs/benchmarks/gpu/triton-tune.json), and the sweep must fit its step
SWAP = (False, True)
# (units, batch): the default model's hidden layer at a large batch, and a wide layer at a mid and a large one
LAYERS = ((1024, 65536), (8192, 4096), (8192, 65536))
TIMING = {"warmup": 10, "rep": 40, "return_mode": "median"}  # triton.testing.do_bench: ms of CUDA events


def layer(units: int, dtype: torch.dtype, device: torch.device, b: int = 64, density: float = 0.25):
    """Random block-sparse weights: every output tile-row with its own distinct live input tiles."""
    g = torch.Generator().manual_seed(units)
    tiles = units // b
    k = max(1, round(tiles * density))
    idx = torch.stack([torch.randperm(tiles, generator=g)[:k] for _ in range(tiles)]).to(torch.int32)
    blocks = (torch.randn(tiles, k * b, b, generator=g) / math.sqrt(k * b)).to(dtype)
    bias = torch.randn(tiles * b, generator=g).to(dtype)
    return blocks.to(device), idx.to(device), bias.to(device)


def measure(precisions: list[str], layers=LAYERS, device: str = "cuda") -> dict:
    from triton.testing import do_bench

    from g2gserve.runtime.precision import matmul_precision, torch_dtype
    from g2gserve.runtime.triton_kernel import block_sparse_linear

    dev = torch.device(device)
    rows = []
    for precision in precisions:
        dtype = torch_dtype(precision)
        tf32 = precision == "tf32"
        for units, batch in layers:
            blocks, idx, bias = layer(units, dtype, dev)
            x = torch.randn(batch, units, device=dev).to(dtype)
            out = torch.empty_like(x)
            dense_w = torch.randn(units, units, device=dev).to(dtype) / math.sqrt(units)
            with matmul_precision(precision):  # cuBLAS at the kernel's precision
                dense_ms = do_bench(lambda: torch.relu_(torch.addmm(bias, x, dense_w, out=out)), **TIMING)
            for block_n, warps, stages, swap in itertools.product(ROWS, WARPS, STAGES, SWAP):
                launch = {"block_n": block_n, "warps": warps, "stages": stages, "swap": swap}
                try:
                    ms = do_bench(lambda: block_sparse_linear(x, blocks, idx, bias, allow_tf32=tf32, out=out,
                                                              launch=launch), **TIMING)
                except Exception as e:  # noqa: BLE001  (a setting that does not fit: out of shared memory, ...)
                    ms, error = None, f"{type(e).__name__}: {str(e)[:120]}"
                else:
                    error = None
                rows.append({"precision": precision, "units": units, "batch": batch, **launch, "ms": ms,
                             "dense_ms": dense_ms, "error": error})
                print(f"{precision} {units}@{batch} rows {block_n} warps {warps} stages {stages} swap {swap:d}: "
                      f"{'failed ' + error if error else f'{ms:.3f} ms'} (dense {dense_ms:.3f} ms)", flush=True)
            del blocks, idx, bias, x, out, dense_w
            torch.cuda.empty_cache()
    return {"rows": rows, "best": best(rows)}


def best(rows: list[dict]) -> dict:
    """Per precision, the setting with the smallest geometric mean of time / best time over the layers (only
    settings that ran on every layer)."""
    choice = {}
    for precision in sorted({r["precision"] for r in rows}):
        mine = [r for r in rows if r["precision"] == precision]
        fastest = {}
        for r in mine:
            if r["ms"] is not None:
                key = (r["units"], r["batch"])
                fastest[key] = min(fastest.get(key, math.inf), r["ms"])
        scores = {}
        for setting, group in itertools.groupby(sorted(mine, key=_setting), key=_setting):
            group = list(group)
            if all(r["ms"] is not None for r in group) and len(group) == len(fastest):
                scores[setting] = math.exp(sum(math.log(r["ms"] / fastest[(r["units"], r["batch"])])
                                               for r in group) / len(group))
        if scores:
            setting = min(scores, key=scores.get)
            block_n, warps, stages, swap = setting
            choice[precision] = {"block_n": block_n, "warps": warps, "stages": stages, "swap": swap,
                                 "geomean_vs_best": round(scores[setting], 4)}
    return choice


def _setting(r: dict) -> tuple[int, int, int, bool]:
    return r["block_n"], r["warps"], r["stages"], bool(r.get("swap", False))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m g2gserve.bench.triton_tune", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--precisions", default="tf32,bf16", help="comma-separated: fp32, tf32, bf16, fp16")
    p.add_argument("--write", action="store_true", help="store the result where launch_config reads it")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    import triton

    from g2gserve.bench.measure import machine_info
    from g2gserve.runtime import triton_kernel

    result = measure([s for s in args.precisions.split(",") if s])
    result["machine"] = machine_info() | {"gpu": torch.cuda.get_device_name(), "triton": triton.__version__}
    result["command"] = "python -m g2gserve.bench.triton_tune " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.write:  # the runtime's copy: the choice, where and how it was measured (the rows stay in --out)
        atomic_write_text(triton_kernel.TUNED_PATH,
                          json.dumps({k: result[k] for k in ("best", "machine", "command")}, indent=1) + "\n")
        print(f"wrote {triton_kernel.TUNED_PATH}")
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    print(json.dumps(result["best"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
