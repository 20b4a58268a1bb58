"""Checkpoint -> export bundle (packed weights, ONNX graphs, manifest), parity-gated. Reading: ``g2gserve.bundle``.

The writer (torch, onnx) is imported on first use, so ``from g2gserve.export import ExportError`` stays light.
"""
from g2gserve.bundle import ExportError  # noqa: F401

_WRITER = ("PARITY_BATCHES", "PARITY_TOL", "Artifacts", "build_artifacts", "check_parity", "export_checkpoint",
           "parity_images")


def __getattr__(name: str):
    if name in _WRITER:
        from g2gserve.export import writer
        return getattr(writer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ExportError", *_WRITER]
