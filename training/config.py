"""``TrainConfig``: every setting of a training run in one dataclass, stored in the run's files.

As in nanoGPT's ``train.py``, the config is the run: the CLI turns flags into a ``TrainConfig``,
``train(cfg)`` runs it, ``state.pt`` and ``model.pt`` keep it, and ``--resume`` compares the saved
config with the flags typed now (not argv with argv). Fields marked ``run=False`` say *how* to run
(device, threads, where to write, progress) and may change between invocations; every other field
defines *what* is trained and must match on resume.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from g2gserve.data.datasets import DataError, dataset_info
from g2gserve.model.config import ModelConfig

from .dst import PRESETS, DSTConfig


class ConfigError(ValueError):
    """A setting is impossible or contradicts the saved run; the message names the flag."""


def _how(default):
    """A field that says how to run, not what is trained: free to differ on --resume."""
    return field(default=default, metadata={"run": False})


@dataclass(frozen=True)
class TrainConfig:
    # data
    dataset: str = "fashion-mnist"
    augment: bool | None = None  # None: the data set's default (crop + flip for CIFAR)
    # model
    model: str = "g2g"
    grouping: str = "mixer"
    groups: int = 8
    sparsity: float = 0.75
    granularity: str = "block"
    block_size: int = 64
    hidden: tuple[int, ...] = (1024, 1024, 1024)
    # dynamic sparse training
    dst: str = "auto"
    prune: str | None = None
    regrow: str | None = None
    dst_interval: int = 200
    dst_fraction: float = 0.3
    dst_end: float = 0.75
    dst_schedule: str = "cosine"
    dst_fade: int = 0
    dst_keep_groups: bool = False
    # optimisation
    epochs: int = 10
    batch_size: int = 256  # global batch: split across ranks under torchrun
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    # how to run
    data_dir: Path | None = _how(None)
    device: str = _how("auto")
    threads: int | None = _how(None)
    out: Path | None = _how(None)
    resume: bool = _how(False)
    stop_after: int | None = _how(None)
    progress: bool = _how(True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        try:
            info = dataset_info(self.dataset)
        except DataError as e:
            raise ConfigError(str(e)) from e
        if self.augment is None:
            object.__setattr__(self, "augment", info.augment)
        if self.out is None:
            object.__setattr__(self, "out", self.default_out(self.dataset, self.model))
        for name in ("data_dir", "out"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        try:
            self.model_config()
            self.dst_config()
        except ValueError as e:
            raise ConfigError(str(e)) from e

    @staticmethod
    def default_out(dataset: str, model: str) -> Path:
        return Path("runs") / f"{dataset}-{model}"

    # ------------------------------------------------------------ what the settings mean
    def model_config(self) -> ModelConfig:
        info = dataset_info(self.dataset)
        return ModelConfig(kind=self.model, in_channels=info.channels, image_size=info.image_size,
                           num_classes=info.num_classes, hidden=self.hidden, groups=self.groups,
                           grouping=self.grouping, sparsity=self.sparsity, granularity=self.granularity,
                           block_size=self.block_size, mask_seed=self.seed)

    def dst_config(self) -> DSTConfig | None:
        """The rewiring rule the settings ask for, or None for static masks."""
        preset = self.dst
        if preset == "auto":
            preset = "hebbian" if self.model == "g2g" else "none"
        if preset == "none" and self.prune is None and self.regrow is None:
            return None
        if self.model not in ("g2g", "er"):
            raise ValueError(f"--dst {self.dst} needs a sparse model (g2g or er), not {self.model}")
        if self.dst_keep_groups and self.model != "g2g":
            raise ValueError("--dst-keep-groups needs a g2g model (its groups are what it keeps)")
        prune, regrow = PRESETS.get(preset, PRESETS["hebbian"])
        return DSTConfig(prune=self.prune or prune, regrow=self.regrow or regrow, interval=self.dst_interval,
                         fraction=self.dst_fraction, end=self.dst_end, schedule=self.dst_schedule,
                         fade=self.dst_fade, keep_groups=self.dst_keep_groups)

    def advice(self) -> list[str]:
        """Settings our own measurements advise against, said once at the start of a run (not refused)."""
        dst = self.dst_config()
        if (self.model == "g2g" and self.granularity == "block" and self.sparsity > 0.75 and dst and dst.fraction > 0.1
                and not dst.keep_groups):
            return [f"block masks at {self.sparsity:.2%} sparsity with DST moving {dst.fraction:.0%} of the live tiles "
                    f"every {dst.interval} steps lost 7 points on CIFAR-10 against static masks or a gentle DST "
                    "(docs/regimes-875.md): consider --dst-keep-groups (only tiles across groups move), --dst none, "
                    "or --dst-fraction 0.1 --dst-interval 1000 --dst-schedule constant"]
        return []

    # ------------------------------------------------------------ storing and comparing
    @classmethod
    def run_fields(cls) -> tuple[str, ...]:
        """The fields that define the run (compared on --resume, stored with the run)."""
        return tuple(f.name for f in fields(cls) if f.metadata.get("run", True))

    def to_dict(self) -> dict:
        """The defining fields as plain values (lists for tuples): storable with weights_only loading."""
        d = asdict(self)
        return {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in self.run_fields()}

    def differences(self, saved: dict) -> dict[str, tuple]:
        """{field: (ours, saved)} for every defining field that differs from a stored ``to_dict()``."""
        mine = self.to_dict()
        return {k: (mine[k], saved.get(k)) for k in self.run_fields() if mine[k] != saved.get(k)}

    def with_saved(self, saved: dict) -> "TrainConfig":
        """This config's how-to-run settings with a stored run's defining settings."""
        known = {k: (tuple(v) if k == "hidden" else v) for k, v in saved.items() if k in self.run_fields()}
        return replace(self, **known)
