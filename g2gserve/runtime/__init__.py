"""Inference runtimes: ``load(MODEL, backend=...)`` and the backends behind it."""
from g2gserve.runtime.loader import (BACKENDS, VARIANTS, CheckpointError, ExportError, InferenceModel, load,  # noqa: F401
                                     open_bundle)
