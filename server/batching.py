"""Dynamic micro-batching: concurrent requests share one forward pass.

Requests queue their images; a single worker takes the first waiting request, then keeps collecting
until ``max_batch`` images or ``max_wait_s`` have passed, runs one forward pass in a worker thread
(the event loop keeps accepting requests meanwhile), and hands every request its rows. The queue is
bounded in *images*: a full queue is refused at once (HTTP 503) instead of growing without bound.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch


class QueueFull(RuntimeError):
    pass


@dataclass
class _Item:
    images: torch.Tensor
    future: asyncio.Future
    enqueued: float


@dataclass
class BatchResult:
    probs: torch.Tensor
    queue_s: float  # waiting before the forward pass started
    inference_s: float  # the forward pass this request was part of


class MicroBatcher:
    def __init__(self, predict: Callable[[torch.Tensor], torch.Tensor], max_batch: int, max_wait_s: float,
                 max_queue_images: int, on_batch: Callable[[int, float], None] | None = None):
        self.predict, self.max_batch, self.max_wait_s = predict, max_batch, max_wait_s
        self.max_queue_images = max_queue_images
        self.on_batch = on_batch
        self.pending_images = 0
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._carry: _Item | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="g2g-infer")
        self._task: asyncio.Task | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="g2g-batcher")

    async def submit(self, images: torch.Tensor) -> BatchResult:
        n = images.shape[0]
        if self.pending_images + n > self.max_queue_images:
            raise QueueFull(f"{self.pending_images} images are already waiting (limit {self.max_queue_images})")
        future = asyncio.get_running_loop().create_future()
        self.pending_images += n
        self._idle.clear()
        self._queue.put_nowait(_Item(images, future, time.perf_counter()))
        return await future

    async def _next(self, timeout: float | None) -> _Item | None:
        if self._carry is not None:
            item, self._carry = self._carry, None
            return item
        if timeout is None:
            return await self._queue.get()
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next(None)
            batch, count = [first], first.images.shape[0]
            deadline = time.perf_counter() + self.max_wait_s
            while count < self.max_batch:
                item = await self._next(max(0.0, deadline - time.perf_counter()))
                if item is None:
                    break
                if count + item.images.shape[0] > self.max_batch:
                    self._carry = item  # first in the next batch
                    break
                batch.append(item)
                count += item.images.shape[0]
            started = time.perf_counter()
            try:
                images = torch.cat([it.images for it in batch])
                chunks = [await loop.run_in_executor(self._executor, self.predict, images[i:i + self.max_batch])
                          for i in range(0, len(images), self.max_batch)]
                probs = np.concatenate([np.asarray(c) for c in chunks])  # predict returns numpy
            except Exception as e:  # noqa: BLE001 - handed to every waiting request
                for it in batch:
                    if not it.future.done():
                        it.future.set_exception(e)
            else:
                elapsed = time.perf_counter() - started
                if self.on_batch:
                    self.on_batch(count, elapsed)
                row = 0
                for it in batch:
                    n = it.images.shape[0]
                    if not it.future.done():
                        it.future.set_result(BatchResult(probs[row:row + n], started - it.enqueued, elapsed))
                    row += n
            finally:
                self.pending_images -= count
                if self.pending_images == 0:
                    self._idle.set()

    async def drain(self, timeout: float = 30.0) -> None:
        """Let queued requests finish (graceful shutdown), then stop the worker."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)
