"""One epoch of training and one evaluation pass: shared by fit, the timing script and reproduce."""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from g2gserve.data.datasets import ImageSet, batches
from g2gserve.data.preprocess import Preprocess

from .distributed import SINGLE, World


def run_generator(seed: int, counter: int) -> torch.Generator:
    """Randomness that depends only on (seed, counter), e.g. an epoch's shuffling or a DST update's draws, so a
    resumed run replays it exactly."""
    return torch.Generator().manual_seed(seed * 1_000_003 + counter)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """Shuffling/augmentation randomness of one epoch."""
    return run_generator(seed, epoch)


def cosine_lambda(total_steps: int):
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))


def train_epoch(model, data: ImageSet, preprocess: Preprocess, optimizer, scheduler, batch_size: int,
                generator: torch.Generator, augment: bool, device: torch.device, desc: str = "train",
                progress: bool = True, world: World = SINGLE) -> dict:
    """Train one epoch; returns mean loss, accuracy and wall time over the whole (global) epoch.

    ``batch_size`` is the global batch; in a ``world`` of several ranks this one trains on its shard of each
    (``model`` is then DDP, which averages gradients over ranks). The loss is summed and divided by
    the global batch size times ``1/world``, so the averaged gradient is exactly the single-process one,
    even for a last batch that does not split evenly. The only host-device synchronisation is at the end.
    """
    model.train()
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    start = time.perf_counter()
    n = len(data)
    sizes = [min(batch_size, n - s) for s in range(0, n, batch_size)]
    bar = tqdm(zip(sizes, batches(data, batch_size, generator, augment, world.rank, world.size)), total=len(sizes), desc=desc,
               leave=False, disable=None if progress else True, unit="batch")  # None: off when not a terminal
    for global_n, (x, y) in bar:
        logits = model(preprocess(x.to(device, non_blocking=True)))
        loss_sum = F.cross_entropy(logits, y.to(device, non_blocking=True), reduction="sum")
        optimizer.zero_grad(set_to_none=True)
        (loss_sum * (world.size / global_n)).backward()
        optimizer.step()
        scheduler.step()
        total_loss += loss_sum.detach()
        correct += (logits.argmax(1) == y).sum()
    stats = torch.stack([total_loss.double(), correct.double()])
    world.sum_(stats)
    return {"train_loss": float(stats[0]) / n, "train_acc": float(stats[1]) / n,
            "train_time_s": time.perf_counter() - start}


@torch.no_grad()
def evaluate(model, data: ImageSet, preprocess: Preprocess, device: torch.device, batch_size: int = 1000,
             world: World = SINGLE) -> dict:
    """Test loss and accuracy; with several ranks each rank evaluates its shard and the sums are shared."""
    model.eval()
    stats = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y in batches(data, batch_size, rank=world.rank, world=world.size):
        x, y = preprocess(x.to(device)), y.to(device)
        logits = model(x)
        stats[0] += F.cross_entropy(logits, y, reduction="sum").double()
        stats[1] += (logits.argmax(1) == y).sum()
    world.sum_(stats)
    return {"test_loss": float(stats[0]) / len(data), "test_acc": float(stats[1]) / len(data)}

