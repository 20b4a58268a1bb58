"""Inference runtimes: ``load(MODEL, backend=...)`` and the backends behind it."""
from g2gserve.runtime.loader import BACKENDS, CPU_BACKENDS, DTYPES, VARIANTS, CheckpointError, ExportError, InferenceModel, load  # noqa: F401
