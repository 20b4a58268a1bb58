"""onnxruntime sessions for the runtime, the export's parity check and the benchmark's profiler."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def ort_session(model: Any, threads: int | None = None, profile_prefix: str | None = None):
    """A CPU ``InferenceSession`` for an ONNX file path or an in-memory ``onnx.ModelProto``.

    Spinning is off: a serving process idles most of the time and must not burn a core waiting."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError("the onnxruntime backend needs onnxruntime: pip install 'g2gserve[serve]'") from e
    opts = ort.SessionOptions()
    if profile_prefix:
        opts.enable_profiling, opts.profile_file_prefix = True, profile_prefix
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
