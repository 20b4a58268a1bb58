"""Errors shared across layers, importable without torch (the slim serving install has none)."""
from __future__ import annotations


class CheckpointError(ValueError):
    """A file is missing, corrupt, or not a g2gserve checkpoint; the message names the file."""
