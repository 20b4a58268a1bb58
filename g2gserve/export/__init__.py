"""Checkpoint -> export bundle (packed weights, ONNX graphs, manifest), parity-gated."""
from g2gserve.export.writer import *  # noqa: F401,F403
from g2gserve.export.writer import ExportError, build_artifacts, export_checkpoint, read_export, ort_session  # noqa: F401
