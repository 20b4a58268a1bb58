"""Measuring sparse against dense: interleaved latency, percentiles, peak memory of fresh processes.

Shared by ``g2g-bench`` and the server's ``/stats`` (both call ``sparse_vs_dense``, one implementation). Machines are noisy, so the sparse model and its
dense twin run alternately (A B A B ...) in one process after a warm-up, and the speedup is computed
pair by pair (median of dense_i / sparse_i), never from two separate runs. ``run_length`` > 1 times
warm-cache runs of each model instead (A A A B B B ...), see ``interleaved``.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Callable, Hashable

import numpy as np

CHUNK_SECONDS = 0.5  # backends take turns in chunks this long (see sparse_vs_dense)


@dataclass
class Latency:
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    samples: int

    @classmethod
    def of(cls, seconds: list[float]) -> "Latency":
        s = sorted(seconds)
        q = lambda f: s[min(len(s) - 1, int(round(f * (len(s) - 1))))] * 1e3  # noqa: E731
        return cls(q(0.50), q(0.95), q(0.99), statistics.fmean(s) * 1e3, len(s))


def _timer(device: Any | None):
    """A function timing one call: CUDA events (with synchronisation) on GPU, perf_counter on CPU."""
    if device is not None and getattr(device, "type", device) == "cuda":
        import torch  # only on the GPU path: a slim (torch-free) server never gets here

        def time_cuda(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end) / 1e3
        return time_cuda

    def time_cpu(fn):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    return time_cpu


def interleaved(runs: dict[Hashable, Callable[[], object]], warmup: int = 10, min_iters: int = 20, max_iters: int = 1000,
                seconds: float = 2.0, device: Any | None = None, run_length: int = 1) -> dict[Hashable, list[float]]:
    """Time the callables in rotation (A B C ...), ``warmup`` rounds first; stop after ``seconds`` (>= min_iters each).

    ``run_length`` 1 is strict A B A B: every call follows a call of another model, which has pushed this
    one's weights out of the caches (cold); sample i of every callable comes from round i. With
    ``run_length`` N > 1 each model runs N + 1 times in a row and the first call after a switch is not
    counted: every sample is warm, as in a server that runs one model, while the rotation still exposes
    all of them to the same drift.
    """
    if run_length < 1:
        raise ValueError(f"run_length must be at least 1, got {run_length}")
    timer = _timer(device)
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    start = time.perf_counter()
    while True:
        for k, fn in runs.items():
            if run_length > 1:
                fn()
            times[k].extend(timer(fn) for _ in range(run_length))
        n = len(next(iter(times.values())))
        if n >= max_iters or (n >= min_iters and time.perf_counter() - start >= seconds):
            return times


def pairwise_speedup(sparse: list[float], dense: list[float]) -> float:
    """Median over interleaved pairs of dense_i / sparse_i."""
    return statistics.median(d / s for s, d in zip(sparse, dense))


def model_input(model, batch: int) -> np.ndarray:
    """Normalised input for ``model.logits``: random uint8 images of the model's shape (seeded by ``batch``)."""
    images = np.random.default_rng(batch).integers(0, 256, (batch, *model.input_shape), dtype=np.uint8)
    return model.preprocess(images)


def sparse_vs_dense(pairs: dict[str, tuple[Any, Any]], batches: list[int], seconds: float, device: Any | None = None,
                    run_length: int = 1, log: Callable[[str], None] | None = None) -> list[dict]:
    """Time each backend's sparse model against its dense twin at every batch size: one row per (backend, batch).

    ``pairs`` maps a backend name to loaded ``(sparse, dense)`` models. The backends take turns in chunks of
    ~``CHUNK_SECONDS`` (each chunk A B A B for one backend after a short warm-up), so a slow patch of a noisy
    machine hits all of them alike and "best vs best" compares the same minutes, while every call still follows
    the other model of its pair. ``device`` (torch, CUDA) is used by the torch and triton backends only.
    """
    chunks = max(1, round(seconds / CHUNK_SECONDS))
    rows = []
    for n in batches:
        calls, times = {}, {}
        for backend, (sparse, dense) in pairs.items():
            x = model_input(sparse, n)
            if backend in ("torch", "triton"):  # a tensor on the model's device: no conversion or copy inside the timing
                import torch
                x = torch.from_numpy(x).to(device if device is not None else "cpu")
            calls[backend] = {"sparse": partial(sparse.logits, x), "dense": partial(dense.logits, x)}
            times[backend] = {"sparse": [], "dense": []}
        for chunk in range(chunks):
            for backend in pairs:
                t = interleaved(calls[backend], warmup=10 if chunk == 0 else 3, seconds=seconds / chunks,
                                min_iters=-(-20 // chunks), max_iters=-(-1000 // chunks),
                                device=device if backend in ("torch", "triton") else None, run_length=run_length)
                for v in ("sparse", "dense"):
                    times[backend][v] += t[v]
        for backend in pairs:
            ts, td = times[backend]["sparse"], times[backend]["dense"]
            ls, ld = Latency.of(ts), Latency.of(td)
            rows.append({"backend": backend, "batch": n, "sparse": as_dict(ls), "dense": as_dict(ld),
                         "speedup": pairwise_speedup(ts, td),
                         "throughput_sparse": n / (ls.p50_ms / 1e3), "throughput_dense": n / (ld.p50_ms / 1e3)})
            if log:
                r = rows[-1]
                log(f"{backend:<12} batch {n:>4}: sparse p50 {ls.p50_ms:8.3f} ms  dense p50 {ld.p50_ms:8.3f} ms  "
                    f"speedup {r['speedup']:.2f}x")
    return rows


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "isa": vector_isa(), "machine": platform.machine(),
            "python": platform.python_version(), "torch": None, "gpu": None}
    for module in ("torch", "onnxruntime", "numba"):
        if module == "torch" and "torch" not in sys.modules:
            continue  # a slim (torch-free) process stays so
        try:
            info[module] = str(__import__(module).__version__)
        except ImportError:
            pass
    if info["torch"] and sys.modules["torch"].cuda.is_available():
        info["gpu"] = sys.modules["torch"].cuda.get_device_name(0)
    return info


def vector_isa() -> str:
    """The widest x86 vector extension the CPU reports (from /proc/cpuinfo flags), or the machine name."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    for isa in ("avx512f", "avx2", "avx", "sse4_2"):
        if isa in flags:
            return isa.upper().replace("_", ".")
    return platform.machine()


def pin_threads(threads: int) -> list[int] | None:
    """Use ``threads`` intra-op threads and, where the OS allows, pin the process to as many cores."""
    import torch
    torch.set_num_threads(threads)
    try:
        cores = sorted(os.sched_getaffinity(0))[:threads]
        os.sched_setaffinity(0, cores)
        return cores
    except (AttributeError, OSError):
        return None


def peak_memory(model: str, backend: str, variant: str, batch: int, device: str = "cpu", threads: int = 1,
                timeout: float = 300, slim: bool = False) -> dict:
    """Peak resident memory (VmHWM) of a fresh process that loads ``model`` and runs a fixed request mix.

    A fresh process, because a forked child inherits its parent's peak (shared notes). ``slim``: torch blocked
    in that process, as in a ``[serve]``-only install (onnxruntime and fused backends).
    """
    cmd = [sys.executable, "-m", "g2gserve.bench.memprobe", str(model), "--backend", backend, "--variant", variant,
           "--batch", str(batch), "--device", device, "--threads", str(threads)] + (["--slim"] if slim else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def as_dict(latency: Latency) -> dict:
    return asdict(latency)


def ort_node_profile(onnx_path: str, batch: int, input_shape: tuple[int, ...], threads: int = 1, runs: int = 200,
                     skip: int = 50) -> dict:
    """Where onnxruntime spends a forward pass: median microseconds per node, summed per op type, next to the
    median of the whole run (the difference is per-node and per-run overhead). Uses onnxruntime's profiler."""
    from g2gserve.runtime.ort import ort_session  # onnxruntime: only when profiling
    with tempfile.TemporaryDirectory() as tmp:
        session = ort_session(onnx_path, threads, profile_prefix=os.path.join(tmp, "ort"))
        x = np.random.default_rng(0).random((batch, *input_shape), dtype=np.float32)
        for _ in range(runs):
            session.run(None, {"input": x})
        with open(session.end_profiling()) as f:
            events = json.load(f)
    per_node: dict[tuple[str, str], list[float]] = {}
    model_runs = []
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_node.setdefault((e["args"]["op_name"], e["name"]), []).append(e["dur"])
        elif e.get("cat") == "Session" and e["name"] == "model_run":
            model_runs.append(e["dur"])
    by_op: dict[str, float] = {}
    for (op, _), durations in per_node.items():
        by_op[op] = by_op.get(op, 0.0) + statistics.median(durations[skip:] or durations)
    return {"batch": batch, "nodes": len(per_node), "run_us": statistics.median(model_runs[skip:] or model_runs),
            "nodes_us": sum(by_op.values()), "by_op_us": dict(sorted(by_op.items(), key=lambda kv: -kv[1]))}
