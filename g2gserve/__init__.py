"""g2gserve: train sparse, brain-inspired G2GNets, export them compactly, serve them fast.

Nothing heavy is imported here: ``import g2gserve`` must work in a slim serving install (no torch).
``ModelConfig``, ``G2GNet`` and ``build_model`` are loaded on first access.
"""
__version__ = "0.1.0"

_LAZY = {"ModelConfig": "g2gserve.model.config", "G2GNet": "g2gserve.model.g2gnet",
         "build_model": "g2gserve.model.g2gnet"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'g2gserve' has no attribute {name!r}")


__all__ = ["ModelConfig", "G2GNet", "build_model", "__version__"]
