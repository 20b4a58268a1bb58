"""Inference runtimes: ``load(MODEL, backend=...)`` and the backends behind it."""
from g2gserve.runtime.loader import (BACKENDS, CPU_BACKENDS, DTYPES, VARIANTS,  # noqa: F401
                                     CheckpointError, ExportError, InferenceModel, load, open_bundle)
