"""Inference runtimes: ``load(MODEL, backend=...)`` and the backends behind it."""
from g2gserve.runtime.loader import (BACKENDS, CPU_BACKENDS, DTYPES, VARIANTS, CheckpointError, ExportError,  # noqa: F401
                                     InferenceModel, load, open_bundle)
