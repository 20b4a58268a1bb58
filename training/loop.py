"""One epoch of training and one evaluation pass: shared by fit, the timing script and reproduce."""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from g2gserve.data.datasets import ImageSet, batches
from g2gserve.data.preprocess import Preprocess


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error, not a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device; use --device auto or cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; choose auto, cpu or cuda")
    return torch.device(name)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """Shuffling/augmentation randomness of one epoch depends only on (seed, epoch): resume replays it."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def cosine_lambda(total_steps: int):
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))


def train_epoch(model, data: ImageSet, preprocess: Preprocess, optimizer, scheduler, batch_size: int,
                generator: torch.Generator, augment: bool, device: torch.device, desc: str = "train",
                progress: bool = True, step_hook=None) -> dict:
    """Train one epoch; returns mean loss, accuracy and wall time. ``step_hook(step)`` runs after each step."""
    model.train()
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    start = time.perf_counter()
    steps = math.ceil(len(data) / batch_size)
    bar = tqdm(batches(data, batch_size, generator, augment), total=steps, desc=desc, leave=False,
               disable=None if progress else True, unit="batch")  # None: off when not a terminal
    for x, y in bar:
        x, y = preprocess(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step_hook is not None:
            step_hook()
        total_loss += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"train_loss": float(total_loss) / len(data), "train_acc": float(correct) / len(data),
            "train_time_s": time.perf_counter() - start}


@torch.no_grad()
def evaluate(model, data: ImageSet, preprocess: Preprocess, device: torch.device, batch_size: int = 1000) -> dict:
    model.eval()
    total_loss, correct = 0.0, 0
    for x, y in batches(data, batch_size):
        x, y = preprocess(x.to(device)), y.to(device)
        logits = model(x)
        total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    return {"test_loss": total_loss / len(data), "test_acc": correct / len(data)}
