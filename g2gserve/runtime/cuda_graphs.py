"""CUDA graphs per batch-size bucket: a forward pass replayed as one graph instead of dozens of launches.

Eager, a small batch on the GPU is launch-bound (every layer is a few kernel launches of microseconds each);
a captured graph replays them all at once. Graphs have fixed shapes, so batches are padded up to the next
power of two (1, 2, 4, ... up to ``max_batch`` rounded up) and each bucket gets its own graph, captured the
first time it is needed (``capture_all`` captures them up front, as a server does at start-up). All graphs
share one memory pool; their outputs are copied out before the next replay. Larger batches run in chunks of
the largest bucket.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import torch


def buckets(max_batch: int) -> list[int]:
    """Powers of two from 1 up to the first one >= ``max_batch``."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    sizes = [1]
    while sizes[-1] < max_batch:
        sizes.append(sizes[-1] * 2)
    return sizes


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: torch.Tensor
    outputs: torch.Tensor


class GraphRunner:
    """``fn`` (float input (N, *input_shape) on ``device`` -> output (N, ...)) behind per-bucket CUDA graphs.

    ``fn`` must be capturable: no host synchronisation, no data-dependent shapes; rows must be independent
    (padding rows are computed and dropped).
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], input_shape: tuple[int, ...],
                 device: torch.device, max_batch: int, warmup: int = 2):
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.fn, self.input_shape, self.device, self.warmup = fn, tuple(input_shape), device, warmup
        self.sizes = buckets(max_batch)
        self._graphs: dict[int, _Captured] = {}
        self._pool = torch.cuda.graph_pool_handle()
        self._lock = threading.Lock()  # one replay at a time: graphs share their static buffers and memory pool

    def bucket(self, n: int) -> int:
        return next(s for s in self.sizes if s >= n)

    def _capture(self, size: int) -> _Captured:
        inputs = torch.zeros(size, *self.input_shape, device=self.device)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up off the default stream: compiles kernels, allocates workspaces
            for _ in range(self.warmup):
                self.fn(inputs)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            outputs = self.fn(inputs)
        return _Captured(graph, inputs, outputs)

    def capture_all(self) -> None:
        with self._lock:
            for size in self.sizes:
                if size not in self._graphs:
                    self._graphs[size] = self._capture(size)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"expected input (N, {', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}")
        if n > self.sizes[-1]:
            return torch.cat([self(chunk) for chunk in x.split(self.sizes[-1])])
        size = self.bucket(n)
        with self._lock:
            captured = self._graphs.get(size)
            if captured is None:
                captured = self._graphs[size] = self._capture(size)
            captured.inputs[:n].copy_(x, non_blocking=True)
            captured.graph.replay()
            return captured.outputs[:n].clone()
