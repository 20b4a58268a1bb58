"""Adaptive micro-batching: a forward pass starts as soon as the model is free; while it runs, the next one fills.

Requests are admitted *before* their bodies are decoded (``admit``): the batcher estimates how long the request
would queue (the rest of the running pass plus the passes for the images ahead of it, from a cost model fitted to
the passes it has timed) and refuses it at once (``Overloaded`` → HTTP 503 + Retry-After) when that is over
``max_queue_s`` or the images would overflow ``max_queue_images``. An admitted request decodes elsewhere (a thread
pool) and then joins the queue (``Ticket.submit``). The worker takes every waiting request that fits into
``max_batch`` images and runs them as one forward pass, in its own thread unless the pass is shorter than a thread
hop (or, in a process with one core, where a thread cannot run beside the event loop, shorter than a few ms), on
the event loop. It waits at most ``max_wait_s`` for more, and only while admitted requests are still
being decoded; a lone request never waits. Everything here is numpy: no torch on this path.
"""
from __future__ import annotations

import asyncio
import collections
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np


INLINE_S = 0.0003  # a forward pass expected to be shorter runs on the event loop (a thread hop costs about as much)
ONE_CORE_INLINE_S = 0.005  # with one core a thread adds a hop and no parallelism: passes up to this run on the loop
                           # (longer ones still go to the thread, so refusals and /healthz wait a few ms at most)


class Overloaded(RuntimeError):
    """The request would wait too long or overflow the queue; ``retry_after`` in seconds (HTTP Retry-After)."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class QueueFull(Overloaded):
    pass


@dataclass
class _Item:
    images: np.ndarray
    future: asyncio.Future
    enqueued: float


@dataclass
class BatchResult:
    probs: np.ndarray
    queue_s: float  # waiting before the forward pass started
    inference_s: float  # the forward pass this request was part of


class CostModel:
    """Seconds of one forward pass of ``n`` images, ``a + b·n``, least squares over the last passes timed.

    The fit is kept as running sums (added on arrival, subtracted on eviction): it is updated after every forward
    pass, often on the event loop, where rebuilding arrays and calling ``np.polyfit`` cost more than small passes."""

    def __init__(self, window: int = 64):
        self._samples: collections.deque[tuple[int, float]] = collections.deque()
        self._window = window
        self._sums = [0.0] * 5  # Σn, Σt, Σn², Σn·t, Σt/n
        self.fixed_s, self.per_image_s = 0.0, 0.0

    def _add(self, n: int, t: float, sign: float) -> None:
        for i, v in enumerate((n, t, n * n, n * t, t / n)):
            self._sums[i] += sign * v

    def observe(self, n: int, seconds: float) -> None:
        self._samples.append((n, seconds))
        self._add(n, seconds, 1.0)
        if len(self._samples) > self._window:
            self._add(*self._samples.popleft(), -1.0)
        k = len(self._samples)
        sn, st, snn, snt, s_ratio = self._sums
        spread = k * snn - sn * sn  # k² · variance of n: exact for integer n, > 0 unless all n are equal
        if spread > 0:
            b = (k * snt - sn * st) / spread
            self.fixed_s, self.per_image_s = max(0.0, (st - b * sn) / k), max(0.0, b)
        else:
            self.fixed_s, self.per_image_s = 0.0, s_ratio / k
        if self.fixed_s == 0.0 and self.per_image_s == 0.0:  # a degenerate fit: fall back to the mean per image
            self.per_image_s = s_ratio / k

    def seconds(self, n: int) -> float:
        return self.fixed_s + self.per_image_s * n if n > 0 else 0.0


class Ticket:
    """An admitted request's place in the queue: ``submit`` its decoded images, or ``release`` it on an error."""

    def __init__(self, batcher: "MicroBatcher", images: int):
        self._batcher, self.images, self._open = batcher, images, True

    def resize(self, images: int) -> None:
        """The request turned out to carry ``images`` (known once its body is parsed): check and reserve them."""
        b, delta = self._batcher, images - self.images
        if delta > 0:
            b.check(delta)
        b.pending_images += delta
        b._decoding_images += delta
        self.images = images

    async def submit(self, images: np.ndarray) -> BatchResult:
        b = self._batcher
        self.release()  # the reservation becomes a queued item (of its real size)
        return await b._enqueue(images)

    def release(self) -> None:
        if self._open:
            self._open = False
            b = self._batcher
            b._decoding -= 1
            b._decoding_images -= self.images
            b.pending_images -= self.images
            b._arrived.set()  # a waiting batch need not wait for this one any more
            if b.pending_images == 0:
                b._idle.set()


class MicroBatcher:
    def __init__(self, predict: Callable[[np.ndarray], np.ndarray], max_batch: int, max_wait_s: float,
                 max_queue_images: int, on_batch: Callable[[int, float], None] | None = None,
                 max_queue_s: float = math.inf, decode_workers: int = 1, inline_s: float = INLINE_S):
        self.predict, self.max_batch, self.max_wait_s = predict, max_batch, max_wait_s
        self.inline_s = inline_s  # passes expected shorter than this run on the event loop
        self.max_queue_images, self.max_queue_s = max_queue_images, max_queue_s
        self.on_batch = on_batch
        self.cost = CostModel()
        self.decode_workers = decode_workers
        self.decode_s_per_image = 0.0  # running mean, fed by observe_decode
        self.pending_images = 0  # admitted (decoding), queued or in the running pass
        self._queued: collections.deque[_Item] = collections.deque()
        self._queued_images = 0
        self._decoding = 0  # admitted requests not yet submitted
        self._decoding_images = 0
        self._running_until = 0.0  # perf_counter time the running pass is expected to end
        self._running_images = 0
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="g2g-infer")
        self._task: asyncio.Task | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="g2g-batcher")

    # ------------------------------------------------------------------ admission
    def estimated_wait(self, images: int) -> float:
        """Seconds a request of ``images`` would queue before its forward pass starts (the cost model's guess)."""
        ahead = self.pending_images - self._running_images
        full, rest = divmod(ahead, self.max_batch)
        remaining = max(0.0, self._running_until - time.perf_counter()) if self._running_images else 0.0
        decoding = (self._decoding_images + images) * self.decode_s_per_image / self.decode_workers
        return remaining + full * self.cost.seconds(self.max_batch) + self.cost.seconds(rest) + decoding

    def observe_decode(self, images: int, seconds: float) -> None:
        """A request's decoding time (for the wait estimate): exponential mean of seconds per image."""
        per_image = seconds / max(1, images)
        self.decode_s_per_image = per_image if self.decode_s_per_image == 0 else \
            0.9 * self.decode_s_per_image + 0.1 * per_image

    def check(self, images: int) -> None:
        """Raise ``QueueFull`` / ``Overloaded`` if ``images`` more would overflow the queue or wait too long."""
        if self.pending_images + images > self.max_queue_images:
            raise QueueFull(f"{self.pending_images} images are already waiting (limit {self.max_queue_images})",
                            retry_after=self.estimated_wait(images))
        wait = self.estimated_wait(images)
        if wait > self.max_queue_s:
            raise Overloaded(f"the queue would take ~{wait * 1e3:.0f} ms (limit {self.max_queue_s * 1e3:.0f} ms)",
                             retry_after=wait)

    def admit(self, images: int = 1) -> Ticket:
        """Reserve room for a request of ``images`` before decoding it; raises ``Overloaded`` / ``QueueFull``."""
        self.check(images)
        self.pending_images += images
        self._decoding += 1
        self._decoding_images += images
        self._idle.clear()
        return Ticket(self, images)

    async def submit(self, images: np.ndarray) -> BatchResult:
        """Admit and queue already-decoded images (for callers without a decoding step)."""
        return await self.admit(len(images)).submit(images)

    async def _enqueue(self, images: np.ndarray) -> BatchResult:
        n = len(images)
        if self.pending_images + n > self.max_queue_images:  # a request that turned out larger than announced
            raise QueueFull(f"{self.pending_images} images are already waiting (limit {self.max_queue_images})",
                            retry_after=self.estimated_wait(n))
        self.pending_images += n
        self._idle.clear()
        # Always through the worker task, even when the model is free: a request's task runs from its headers to
        # here without yielding, so the requests that arrived in the same read are not admitted yet; the worker
        # runs after them and takes them all into one pass (a pass per request cost 3x as much at 32 clients).
        future = asyncio.get_running_loop().create_future()
        self._queued.append(_Item(images, future, time.perf_counter()))
        self._queued_images += n
        self._arrived.set()
        return await future

    # ------------------------------------------------------------------ the worker
    def _take(self, batch: list[_Item], count: int) -> int:
        while self._queued and (not batch or count + len(self._queued[0].images) <= self.max_batch):
            item = self._queued.popleft()
            n = len(item.images)
            self._queued_images -= n
            batch.append(item)
            count += n
        return count

    async def _next_batch(self) -> tuple[list[_Item], int]:
        while not self._queued:
            self._arrived.clear()
            await self._arrived.wait()
        batch: list[_Item] = []
        count = self._take(batch, 0)
        deadline = time.perf_counter() + self.max_wait_s
        # Wait only for requests already admitted and still decoding, and never past max_wait_s.
        while count < self.max_batch and self._decoding > 0 and not self._queued:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                break
            count = self._take(batch, count)
            if self._queued:  # the next one does not fit
                break
        return batch, count

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch, count = await self._next_batch()
            started = time.perf_counter()
            self._running_images, self._running_until = count, started + self.cost.seconds(count)
            try:
                images = np.concatenate([it.images for it in batch]) if len(batch) > 1 else batch[0].images
                if count <= self.max_batch and 0 < self.cost.seconds(count) < self.inline_s:
                    chunks = [self.predict(images)]  # cheaper than the hop to the inference thread
                else:
                    chunks = [await loop.run_in_executor(self._executor, self.predict, images[i:i + self.max_batch])
                              for i in range(0, len(images), self.max_batch)]
                probs = np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
            except Exception as e:  # noqa: BLE001 - handed to every waiting request
                for it in batch:
                    if not it.future.done():
                        it.future.set_exception(e)
            else:
                elapsed = time.perf_counter() - started
                if count <= self.max_batch:
                    self.cost.observe(count, elapsed)
                if self.on_batch:
                    self.on_batch(count, elapsed)
                row = 0
                for it in batch:
                    n = len(it.images)
                    if not it.future.done():
                        it.future.set_result(BatchResult(probs[row:row + n], started - it.enqueued, elapsed))
                    row += n
            finally:
                self._running_images = 0
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
