"""GPU benchmark: best sparse vs best dense at the same precision, every model behind CUDA graphs.

Per model (a trained export and random-initialised wider G2GNets, where sparsity has room to pay), per
precision and per batch size, three forward passes take turns (A B C A B C ..., CUDA events): the torch
block layer (gather + bmm), the Triton kernel, and the dense twin (cuBLAS). All three run in CUDA graphs
captured for the batch's bucket, at the same precision; the speedup is dense p50 / best sparse p50, checked
against issue 16's targets. ``g2g-bench --device cuda`` calls ``gpu_bench`` and ``markdown``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from g2gserve.bench.measure import Latency, interleaved
from g2gserve.formats import PackedNet, densify, pack_model
from g2gserve.model.config import ModelConfig
from g2gserve.model.g2gnet import build_model
from g2gserve.runtime.cuda_graphs import GraphRunner
from g2gserve.runtime.precision import cast_runner, torch_dtype
from g2gserve.runtime.torch_backend import PackedModule

GPU_DTYPES = ("tf32", "bf16")
GPU_BATCHES = (1, 256, 4096, 65536)
WIDE_HIDDEN = (4096, 8192)
# issue 16: (smallest batch, speedup at least); batch 1 must also take <= 0.05 ms
TARGETS = ((4096, 2.5), (256, 1.5), (1, 1.0))
BATCH1_P50_MS = 0.05


def target(batch: int) -> float:
    return next(t for b, t in TARGETS if batch >= b)


def packed_from(path: Path) -> PackedNet:
    """The packed network of an export directory or a checkpoint."""
    from g2gserve.runtime import open_bundle
    return open_bundle(path, onnx_graphs=False).packed


def wide_model(hidden: int, layers: int = 3) -> PackedNet:
    """A random-initialised default G2GNet (G = 8, 75% sparse, 64x64 tiles) with ``layers`` x ``hidden`` units."""
    torch.manual_seed(0)
    return pack_model(build_model(ModelConfig(hidden=(hidden,) * layers)).eval(), "block")


def gather_bytes(packed: PackedNet, n: int, dtype: str) -> int:
    """The torch block layer's gathered copy of its input at batch ``n`` (the largest layer's), in bytes."""
    size = torch_dtype(dtype).itemsize
    return max((n * l.tensors["idx"].size * l.block_size * size for l in packed.layers if l.format == "block"),
               default=0)


def _modules(packed: PackedNet) -> dict[str, nn.Module]:
    from g2gserve.runtime.triton_backend import TritonModule  # imports triton: only on the GPU path
    dense = densify(packed)
    # the dense twin both ways: all in cuBLAS, and with the triton backend's fused encoder (its layers stay in
    # cuBLAS): the sparse model's fused encoder must not count as a gain of sparsity
    return {"torch sparse": PackedModule(packed), "triton sparse": TritonModule(packed),
            "dense": PackedModule(dense), "triton dense": TritonModule(dense)}


def profile(fn, x: torch.Tensor, calls: int = 5, top: int = 4) -> list[dict]:
    """Where one variant's time goes: the kernels with the most device time over ``calls`` eager calls
    (torch.profiler; per call, in microseconds)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    fn(x)
    with torch_profile(activities=activities) as prof:
        for _ in range(calls):
            fn(x)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
    events = prof.key_averages()
    device_us = lambda e: getattr(e, "self_device_time_total", 0)  # noqa: E731  (torch >= 2.4)
    on_device = [e for e in events if device_us(e) > 0]
    if on_device:
        ranked, key = on_device, device_us
    else:  # CPU, or a profiler that recorded no kernels: the ops' host time, marked as such
        ranked, key = list(events), (lambda e: e.self_cpu_time_total)
    prefix = "" if on_device else "host: "
    return [{"kernel": prefix + e.key[:60], "us_per_call": key(e) / calls}
            for e in sorted(ranked, key=key, reverse=True)[:top]]


def bench_packed(name: str, packed: PackedNet, batches: list[int], dtypes: list[str], seconds: float,
                 device: torch.device) -> tuple[list[dict], list[dict]]:
    """Rows (model, dtype, batch): p50 of each variant, the best sparse one and its speedup over dense; and
    the kernel profiles of the rows that miss their target."""
    rows, profiles = [], []
    budget = torch.cuda.get_device_properties(device).total_memory // 4 if device.type == "cuda" else 2**32
    for dtype in dtypes:  # fresh modules per precision: cast_runner converts its module in place
        eager = {k: cast_runner(m.to(device), dtype) for k, m in _modules(packed).items()}
        runners = {k: GraphRunner(f, tuple(packed.input_shape), device, max(batches)) for k, f in eager.items()}
        for n in batches:
            x = torch.randn(n, *packed.input_shape, device=device)
            gathered = gather_bytes(packed, n, dtype)
            skip = {"torch sparse"} if gathered > budget else set()  # it would not fit next to the rest
            calls = {k: (lambda r=r: r(x)) for k, r in runners.items() if k not in skip}
            times = interleaved(calls, warmup=3, min_iters=10, max_iters=1000, seconds=seconds, device=device)
            p50 = {k: Latency.of(t).p50_ms for k, t in times.items()} | {k: None for k in skip}
            best = min((k for k in ("torch sparse", "triton sparse") if k not in skip), key=p50.get)
            best_dense = min(("dense", "triton dense"), key=p50.get)
            speedup = p50[best_dense] / p50[best]
            met = speedup >= target(n) and (n > 1 or p50[best] <= BATCH1_P50_MS)
            rows.append({"model": name, "dtype": dtype, "batch": n, "p50_ms": p50, "best_sparse": best,
                         "best_dense": best_dense, "speedup": speedup, "target": target(n), "met": met,
                         "gather_bytes": gathered})
            tqdm.write(f"{name} {dtype} batch {n}: " + ", ".join(f"{k} {_ms(v, gathered)}" for k, v in p50.items())
                       + f" -> {speedup:.2f}x ({best})")
            if not met:  # a missed target comes with where the time goes (eager, so kernel by kernel)
                for k in (best, best_dense):
                    try:
                        profiles.append({"model": name, "dtype": dtype, "batch": n, "variant": k,
                                         "kernels": profile(eager[k], x)})
                    except RuntimeError as e:  # a profiler that cannot attach must not cost the benchmark
                        profiles.append({"model": name, "dtype": dtype, "batch": n, "variant": k, "error": str(e)})
        del runners, eager, calls, x  # frees the graphs and their memory pools before the next precision
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, profiles


def gpu_bench(model: Path | None, batches: list[int], dtypes: list[str], seconds: float,
              hidden: list[int], device: str = "cuda") -> dict:
    dev = torch.device(device)
    models = ([(f"{model} (export)", lambda: packed_from(model))] if model is not None else []) + \
             [(f"random G2GNet, 3 x {h} hidden", lambda h=h: wide_model(h)) for h in hidden]
    rows, profiles = [], []
    for name, make in tqdm(models, desc="gpu models", unit="model"):
        packed = make()
        widths = [l.out_features for l in packed.layers]
        cells, where = bench_packed(name, packed, batches, dtypes, seconds, dev)
        rows += [r | {"hidden": widths} for r in cells]
        profiles += where
        del packed
        torch.cuda.empty_cache()
    import triton
    return {"gpu_rows": rows, "gpu_profiles": profiles, "dtypes": dtypes, "triton": triton.__version__}


def _ms(p50: float | None, gathered: int) -> str:
    return f"{p50:.3f}" if p50 is not None else f"n/a (gathers {gathered / 2**30:.0f} GiB)"


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"Machine: GPU {m.get('gpu')}, host CPU {m['cpu']} ({m['cores']} cores), torch {m['torch']}, "
             f"triton {result.get('triton')}. Command: `{result['command']}`", "",
             "Every forward pass replays a CUDA graph captured for its batch bucket (inputs padded to a power of "
             "two); the variants take turns call by call (CUDA events, p50). Best sparse = the faster of the "
             "torch block layer (gather + bmm) and the triton backend (the Triton block kernel and fused encoder); "
             "best dense = the faster dense twin: all in cuBLAS, or with the triton backend's fused encoder; at the "
             f"same precision. Targets (issue 16): batch 1 >= 1.0x and <= {BATCH1_P50_MS} ms, batch 256 >= 1.5x, "
             "batch >= 4096 >= 2.5x.", "",
             "| model | precision | batch | torch sparse (ms) | triton sparse (ms) | dense (ms) | triton dense (ms) "
             "| best sparse vs best dense | target |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["gpu_rows"]:
        p = r["p50_ms"]
        lines.append(f"| {r['model']} | {r['dtype']} | {r['batch']:,} | {_ms(p['torch sparse'], r['gather_bytes'])} | "
                     f"{p['triton sparse']:.3f} | {p['dense']:.3f} | {p['triton dense']:.3f} | "
                     f"**{r['speedup']:.2f}x** ({r['best_sparse'].split()[0]} vs {r['best_dense']}) | "
                     f"{'met' if r['met'] else 'missed'} (>= {r['target']}x) |")
    if result.get("gpu_profiles"):
        lines += ["", "Where the time goes where a target is missed (eager calls, torch.profiler, device time per "
                  "call):",
                  "", "| model | precision | batch | variant | top kernels (us per call) |", "|---|---|---|---|---|"]
        for p in result["gpu_profiles"]:
            what = p.get("error") or ", ".join(f"`{k['kernel']}` {k['us_per_call']:.1f}" for k in p["kernels"])
            lines.append(f"| {p['model']} | {p['dtype']} | {p['batch']:,} | {p['variant']} | {what} |")
    return "\n".join(lines) + "\n"
