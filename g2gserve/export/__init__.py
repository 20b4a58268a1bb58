"""Checkpoint -> export bundle (packed weights, ONNX graphs, manifest), parity-gated. Reading: ``g2gserve.bundle``."""
from g2gserve.bundle import ExportError  # noqa: F401
from g2gserve.export.writer import (PARITY_BATCHES, PARITY_TOL, Artifacts, build_artifacts, check_parity,  # noqa: F401
                                    export_checkpoint, parity_images)
