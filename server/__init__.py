"""Serving layer: the FastAPI app (``g2g-serve``) and latency benchmarking (``g2g-bench``)."""
