"""G MAC/s: the multiply-adds a model needs, and the core's measured peak to compare them with.

Why: a latency ratio says how much faster sparse is than dense, not how close either runs to what the
CPU can do. ``model_macs`` counts the multiply-adds of one forward pass from the packed weights (only
the stored, live weights of a sparse layer: the work the model needs, not the zero padding a kernel may
add), and ``gemm_peak`` times large dense GEMMs (onnxruntime's MatMul, the fastest one we have on a
CPU) on the same threads, so "fraction of peak" is measured in the same run, not taken from a datasheet.

At batch 1 the multiply-adds are not what bounds a forward: every weight is read once, from beyond the L2
cache, and the time is the weights' stream. ``stream_ceiling`` measures that bound for the benchmark's own
access pattern, so a batch-1 ratio can be set against what reading the weights alone allows.
"""
from __future__ import annotations

import functools
import time
from pathlib import Path

import numpy as np

from g2gserve.formats import PackedLayer, PackedNet

GEMM_SIZES = (512, 1024, 2048)  # M = N = K; the best of them: on a shared machine the larger ones lose most to
#                                 other processes' cache traffic, on a quiet one they all run near peak


def layer_macs(layer: PackedLayer) -> int:
    """Multiply-adds per input row of one packed layer: its stored weights (block tiles, CSR values)."""
    if layer.format == "block":
        return int(layer.tensors["blocks"].size)
    if layer.format == "csr":
        return int(layer.tensors["values"].size)
    return layer.in_features * layer.out_features


def model_macs(packed: PackedNet, batch: int = 1) -> int:
    """Multiply-adds of one forward pass over ``batch`` images: patch conv, hidden layers, head."""
    conv_out = packed.conv_weight.shape[0]
    patches = (packed.image_size // packed.patch_size) ** 2
    conv = patches * conv_out * packed.conv_weight[0].size
    head = packed.head_weight.size
    return batch * int(conv + sum(layer_macs(l) for l in packed.layers) + head)


def packed_of(path: str | Path) -> PackedNet:
    """The packed network of an export directory or a checkpoint (packed the way ``runtime.load`` packs it)."""
    from g2gserve.runtime.loader import open_bundle
    return open_bundle(path, onnx_graphs=False).packed


def gemm_peak(threads: int = 1, seconds: float = 1.5, sizes: tuple[int, ...] = GEMM_SIZES) -> dict:
    """The best G MAC/s of size^3 float32 MatMuls in onnxruntime on ``threads`` threads: per size the best of
    the calls that fit in seconds / len(sizes) (at least 3, after one warm-up call), then the best size."""
    runs = [_gemm(threads, seconds / len(sizes), size) for size in sizes]
    return max(runs, key=lambda r: r["gmacs"]) | {"sizes": {r["size"]: r["gmacs"] for r in runs}}


def _gemm(threads: int, seconds: float, size: int) -> dict:
    import onnx
    from onnx import TensorProto, helper

    from g2gserve.runtime.ort import ort_session

    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [size, size])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [size, size])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [size, size])
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["y"])], "gemm", [a, b], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, onnx.IR_VERSION)
    session = ort_session(model, threads)
    rng = np.random.default_rng(0)
    feeds = {"a": rng.standard_normal((size, size), np.float32), "b": rng.standard_normal((size, size), np.float32)}
    session.run(None, feeds)
    best, calls, start = float("inf"), 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        session.run(None, feeds)
        best, calls = min(best, time.perf_counter() - t), calls + 1
    return {"size": size, "threads": threads, "best_s": best, "gmacs": size ** 3 / best / 1e9}


def stream_ceiling(sparse_bytes: int, dense_bytes: int, seconds: float = 1.0) -> dict:
    """The time to read a buffer of the sparse model's weight bytes and one of the dense twin's (in the memory the
    fused runtime keeps its weights in: huge pages from 2 MB, ``layout.aligned``), each summed once
    per call in strict alternation (each read right after the other has gone through the caches, as g2g-bench's
    strict A B A B runs the two models), medians on the calling thread. A batch-1 forward reads each of its weights
    once, so these are what reading the weights alone takes (one sequential stream, next to no arithmetic: a
    kernel that prefetches can beat it slightly, a forward's fixed costs come on top), and ``ratio`` (dense time
    over sparse time) is what a purely stream-bound sparse model could gain on its twin under that alternation."""
    from g2gserve.runtime.fused.layout import aligned  # the fused runtime's weight memory (huge pages from 2 MB)
    read = _stream_sum()
    rng = np.random.default_rng(0)
    a, b = (aligned(max(16, int(n) // 4), np.float32, 16) for n in (sparse_bytes, dense_bytes))
    a[:], b[:] = rng.random(a.size, dtype=np.float32), rng.random(b.size, dtype=np.float32)
    read(a), read(b)  # compile, first touch
    times: tuple[list[float], list[float]] = ([], [])
    start = time.perf_counter()
    while len(times[0]) < 20 or time.perf_counter() - start < seconds:
        for buffer, out in ((a, times[0]), (b, times[1])):
            t = time.perf_counter()
            read(buffer)
            out.append(time.perf_counter() - t)
    sparse_s, dense_s = float(np.median(times[0])), float(np.median(times[1]))
    return {"sparse_bytes": a.nbytes, "dense_bytes": b.nbytes, "sparse_s": sparse_s, "dense_s": dense_s,
            "sparse_gbs": a.nbytes / sparse_s / 1e9, "dense_gbs": b.nbytes / dense_s / 1e9,
            "ratio": dense_s / sparse_s, "calls": len(times[0])}


@functools.lru_cache(maxsize=None)
def _stream_sum():
    """A float32 sum that LLVM vectorises into several independent vector sums (fast-math): a read of the
    buffer at the core's full load rate, its arithmetic far below what the stream takes. Compiled on first use
    (numba is imported only here: g2g-bench's other paths do not need it)."""
    import numba

    @numba.njit(fastmath=True, nogil=True)
    def total(x):
        s = np.float32(0.0)
        for i in range(x.size):
            s += x[i]
        return s
    return total


def gmacs(macs: int, seconds: float) -> float:
    """G MAC/s of ``macs`` multiply-adds done in ``seconds``."""
    return macs / seconds / 1e9
