"""All of the server's settings in one dataclass: the CLI builds it, ``create_app`` takes it, workers get it as JSON."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from g2gserve.data.images import DEFAULT_MAX_PIXELS
from g2gserve.runtime.precision import dtypes_for

CONFIG_ENV = "G2G_SERVE_CONFIG"  # how ``--workers N`` hands the settings to each worker process


@dataclass
class ServeConfig:
    model: str
    backend: str = "torch"
    device: str = "auto"
    variant: str = "sparse"  # or "dense": serve the dense twin of the same export (for end-to-end comparisons)
    max_batch: int = 32
    max_wait_ms: float = 2.0  # upper bound on waiting for admitted requests that are still decoding; never a fixed cost
    max_queue_ms: float = 200.0  # a request whose estimated queueing exceeds this is answered 503 at once
    max_queue_images: int = 4096  # a memory bound (decoded images are small); the time bound is max_queue_ms
    max_body_bytes: int = 10 * 2**20
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_images_per_request: int = 64
    threads: int | None = None
    dtype: str = "fp32"  # torch/triton: fp32, tf32, bf16, fp16 (runtime.precision); fused: fp32, bf16, int8, int8-static
    decode_threads: int | None = None  # None: one per core this process may run on
    calibrate: bool = True  # time sparse vs dense at start-up (in the background)
    calibration_seconds: float = 1.0
    memory_probe: bool = True  # peak RSS of fresh sparse/dense processes during calibration
    shared_dir: str | None = None  # set by --workers N: one calibration for all workers is kept here
    model_repository: str | None = None  # DIR/<name>/<version>/ export directories, instead of one ``model``
    default_model: str | None = None  # the repository model /classify, /model and /stats use (default: first by name)
    admin_token: str | None = None  # admin calls (server/auth.py; v2 load/unload) exist only with a token
    api_key: str | None = None  # required in X-API-Key for /classify when set
    cors_origins: tuple[str, ...] = ()
    body_timeout_s: float = 30.0  # the whole request body within (408; server/timeouts.py)
    request_timeout_s: float = 60.0  # the whole answer within (503)

    SECRETS = ("admin_token", "api_key")

    def public(self) -> dict:
        """The settings as /stats shows them: secrets only as whether they are set."""
        return {k: (v is not None if k in self.SECRETS else v) for k, v in asdict(self).items()}

    def __post_init__(self) -> None:
        if bool(self.model) == bool(self.model_repository):
            raise ValueError("serve one model (an export directory or model.pt) or a --model-repository, not both")
        if self.max_batch < 1 or self.max_wait_ms < 0 or self.max_queue_images < self.max_batch:
            raise ValueError("need max_batch >= 1, max_wait_ms >= 0 and max_queue_images >= max_batch")
        if self.max_queue_ms <= 0:
            raise ValueError("max_queue_ms must be positive")
        if self.variant not in ("sparse", "dense"):
            raise ValueError(f"unknown variant {self.variant!r}; choose sparse or dense")
        if self.decode_threads is not None and self.decode_threads < 1:
            raise ValueError("decode_threads must be at least 1")
        allowed = dtypes_for(self.backend)
        if self.dtype not in allowed:
            raise ValueError(f"--dtype {self.dtype}: the {self.backend} backend computes in {', '.join(allowed)}")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> "ServeConfig":
        return cls(**json.loads(os.environ[CONFIG_ENV]))
