"""One process or many: what ``train`` needs to know about torchrun's world, in one small object.

Under ``torchrun --nproc_per_node N -m training.fit ...`` every rank trains a DistributedDataParallel
copy of the model on its shard of each global batch (gloo on CPU, nccl on CUDA, one GPU per local
rank). Without torchrun the same object describes a world of one and every collective is a no-op, so
the training code has one path.
"""
from __future__ import annotations

import gc
import inspect
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error, not a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device; use --device auto or cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; choose auto, cpu or cuda")
    return torch.device(name)


@dataclass
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def from_env(cls, device: str) -> "World":
        """Join torchrun's process group when its environment says so (``WORLD_SIZE`` > 1)."""
        dev = resolve_device(device)
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size == 1:
            return cls(device=dev)
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if dev.type == "cuda":
            dev = torch.device("cuda", local)
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=size)
        return cls(rank, size, dev)

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files and prints; the others only train."""
        return self.rank == 0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DDP around ``model`` (gradients averaged across ranks); masks are never broadcast: every rank
        computes the same DST decisions from all-reduced scores, and ``same_everywhere`` checks it."""
        if self.size == 1:
            return model
        ids = [self.device] if self.device.type == "cuda" else None
        ddp = torch.nn.parallel.DistributedDataParallel
        # Newer torch renames broadcast_buffers; the buffers (masks) are equal at init, so either is right.
        no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                   else {"broadcast_buffers": False})
        return ddp(model, device_ids=ids, **no_sync)

    def sum_(self, *tensors: torch.Tensor) -> None:
        """In-place sum of each tensor over all ranks."""
        if self.size > 1:
            for t in tensors:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)

    def same_everywhere(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is identical on every rank (compares a position-weighted float64 digest)."""
        if self.size == 1:
            return True
        flat = t.detach().flatten().to(torch.float64)
        weights = torch.sin(torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64))
        digest = (flat * weights).sum()
        both = torch.stack([digest, -digest])
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        return bool(both[0] == -both[1])

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group together. DDP's reducer (and any gloo work it holds) is freed first, while
        the group still exists: freed later, at interpreter exit, it can abort the rank ("terminate called
        without an active exception", seen once in CI)."""
        if self.size > 1 and dist.is_initialized():
            gc.collect()
            dist.barrier()
            dist.destroy_process_group()


SINGLE = World()  # the world of a plain ``python -m training.fit``
