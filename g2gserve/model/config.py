"""One dataclass describes every model the project builds; ``build_model`` turns it into a network.

No torch here: reading a bundle's config must not import it."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

MODEL_KINDS = ("g2g", "dense", "dense-params", "er")
GROUPINGS = ("index", "random", "mixer")  # how units are assigned to groups (model.masks)
GRANULARITIES = ("edge", "block")         # what a mask decides: single connections or b x b tiles


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a G2GNet or one of its baselines.

    ``g2g``: patch encoder, then sparse modular hidden layers; ``dense``: the same widths, dense;
    ``dense-params``: dense, width solved so its parameter count matches g2g's *active* parameters;
    ``er``: the same widths and density as g2g, connections placed uniformly at random.
    """

    kind: str = "g2g"
    in_channels: int = 1
    image_size: int = 28
    num_classes: int = 10
    patch_grid: int = 4  # the image is cut into patch_grid x patch_grid patches
    conv_channels: int = 32
    hidden: tuple[int, ...] = (1024, 1024, 1024)
    groups: int = 8
    grouping: str = "mixer"
    sparsity: float = 0.75
    granularity: str = "block"
    block_size: int = 64
    mask_seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        self.validate()

    @property
    def patch_size(self) -> int:
        return self.image_size // self.patch_grid

    @property
    def encoder_features(self) -> int:
        return self.conv_channels * self.patch_grid * self.patch_grid

    @property
    def is_sparse(self) -> bool:
        return self.kind in ("g2g", "er")

    def validate(self) -> None:
        """Raise ValueError with a one-line reason for any impossible configuration."""
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"unknown model {self.kind!r}; choose one of {', '.join(MODEL_KINDS)}")
        if self.grouping not in GROUPINGS:
            raise ValueError(f"unknown grouping {self.grouping!r}; choose one of {', '.join(GROUPINGS)}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {self.granularity!r}; choose one of {', '.join(GRANULARITIES)}")
        for name in ("in_channels", "image_size", "num_classes", "patch_grid", "conv_channels", "groups", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.hidden or min(self.hidden) < 1:
            raise ValueError(f"hidden widths must be positive, got {list(self.hidden)}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}")
        if self.image_size % self.patch_grid:
            raise ValueError(f"image size {self.image_size} is not divisible by the {self.patch_grid}x{self.patch_grid} patch grid")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if not self.is_sparse:
            return
        for width in (self.encoder_features, *self.hidden):
            if width % self.groups:
                raise ValueError(f"{self.groups} groups do not divide a layer of {width} units "
                                 f"(encoder {self.encoder_features}, hidden {list(self.hidden)})")
            if self.granularity == "block" and (width // self.groups) % self.block_size:
                raise ValueError(f"block size {self.block_size} does not divide the group size {width // self.groups}")
        if self.kind == "g2g" and self.sparsity > 1.0 - 1.0 / self.groups + 1e-9:
            raise ValueError(f"sparsity {self.sparsity} is impossible with {self.groups} groups: the intra-group "
                             f"blocks alone have density 1/{self.groups}; use more groups or less sparsity")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)} (written by a newer g2gserve?)")
        return cls(**d)
