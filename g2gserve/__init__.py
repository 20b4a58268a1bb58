"""g2gserve: train sparse, brain-inspired G2GNets, export them compactly, serve them fast."""
__version__ = "0.1.0"

from g2gserve.model.config import ModelConfig  # noqa: E402
from g2gserve.model.g2gnet import G2GNet, build_model  # noqa: E402

__all__ = ["ModelConfig", "G2GNet", "build_model", "__version__"]
