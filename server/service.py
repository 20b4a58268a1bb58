"""What the endpoints share: the loaded model, the batcher, the decode pool, metrics, live figures, calibration."""
from __future__ import annotations

import importlib.machinery
import json
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Awaitable, Callable

import numpy as np

from g2gserve.bench.install_size import load_summary
from g2gserve.bench.measure import Latency, peak_memory, sparse_vs_dense
from g2gserve.bench.memprobe import SLIM_BACKENDS
from g2gserve.fileio import atomic_write_text
from g2gserve.runtime import InferenceModel, load

from .batching import INLINE_S, ONE_CORE_INLINE_S, BatchResult, MicroBatcher, Overloaded, Ticket
from .oip.repository import ModelRepository, Served
from .metrics import Metrics
from .settings import ServeConfig

CALIBRATION_FILE = "calibration.json"  # in ServeConfig.shared_dir: the one calibration all workers report
WARMUP_ROUNDS = 4  # forward passes at batch 1 and max batch before a model version serves
LIVE_WINDOW = 10_000  # requests kept for /stats' live figures


def _model_version(manifest: dict) -> str:
    sha = manifest.get("source", {}).get("sha256") or manifest.get("files", {}).get("weights.safetensors", {}).get("sha256")
    return sha[:12] if sha else "in-memory"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _yield_to_event_loop() -> None:
    """Run this (decode) thread at a lower priority, so that on a busy core the event loop gets the CPU at once
    when a request arrives: a long decode never delays /healthz or admission (Linux: per-thread nice)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass


def top_k(probs: np.ndarray, classes: list[str], k: int) -> list[dict]:
    """Per row, the ``k`` most probable classes, most probable first (numpy: no torch needed; plain lists after
    the sort: ``take_along_axis`` cost more than the sort for a few rows)."""
    k = min(k, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k].tolist()
    out = []
    for row, idx in zip(probs.tolist(), order):
        top = [{"class_id": i, "label": classes[i], "probability": row[i]} for i in idx]
        out.append({**top[0], "top_k": top})
    return out


class LiveWindow:
    """The last ``size`` requests' (time, images, latency, decode, queue, inference), in a preallocated ring:
    recording allocates nothing, so a serving process's memory stays flat (a deque of tuples grew by ~1 MiB
    until it was full)."""

    def __init__(self, size: int):
        self._rows = np.zeros((size, 6))
        self._count = 0

    def append(self, *row: float) -> None:
        self._rows[self._count % len(self._rows)] = row
        self._count += 1

    def rows(self) -> np.ndarray:
        """The recorded rows, oldest first."""
        size = len(self._rows)
        if self._count <= size:
            return self._rows[:self._count].copy()
        return np.roll(self._rows, -(self._count % size), axis=0)


class Service:
    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        # every served model and version (one export directory: a repository of one), each with its own batcher
        self.repository = ModelRepository(self.prepare, retired=self.retired,
                                          **({"root": Path(cfg.model_repository)} if cfg.model_repository
                                             else {"single": Path(cfg.model)}))
        self.decode_threads = cfg.decode_threads or usable_cores()
        self.decoder = ThreadPoolExecutor(max_workers=self.decode_threads, thread_name_prefix="g2g-decode",
                                          initializer=_yield_to_event_loop)
        self.metrics = Metrics(cfg.max_batch)
        self.started = False  # the lifespan has loaded the models (and not begun shutting down)
        # per served request: (finished at, images, end-to-end s, decode s, queue s, inference s)
        self.live = LiveWindow(LIVE_WINDOW)
        self._calibration: dict = {"status": "pending"}
        self.bytes_per_image = 0.0  # mean encoded size of the images of several-image requests (admission's guess)
        self._calibration_lock = threading.Lock()

    # -------------------------------------------------------------- the served models
    @property
    def ready(self) -> bool:
        """Started and serving a default model (all of them can be unloaded through the repository API)."""
        return self.started and self.served is not None

    @ready.setter
    def ready(self, value: bool) -> None:
        self.started = value

    @property
    def served(self) -> Served | None:
        """The default model's served version, which /classify, /model and /stats use."""
        name = self.cfg.default_model or min(self.repository.served, default=None)
        return self.repository.served.get(name) if name else None

    @property
    def model(self):
        served = self.served
        return served.model if served else None

    @property
    def batcher(self) -> MicroBatcher | None:
        served = self.served
        return served.batcher if served else None

    def _load(self, variant: str, path: Path):
        cfg = self.cfg
        return load(path, backend=cfg.backend, device=cfg.device, variant=variant, threads=cfg.threads,
                    dtype=cfg.dtype, max_batch=cfg.max_batch)  # CUDA: graphs per batch bucket, captured now

    def predict(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict(images), dtype=np.float32)

    def prepare(self, path: Path) -> tuple[InferenceModel, MicroBatcher]:
        """Load and warm up one model version and make its batcher (in a worker thread: at start-up before the
        server reports ready; in a version swap while the old version keeps answering)."""
        cfg = self.cfg
        if cfg.threads and cfg.backend == "torch":
            import torch  # only the torch backend needs it
            torch.set_num_threads(cfg.threads)
        model = self._load(cfg.variant, path)

        def predict(images: np.ndarray) -> np.ndarray:
            return np.asarray(model.predict(images), dtype=np.float32)
        warm = np.zeros((cfg.max_batch, *model.input_shape), dtype=np.uint8)
        fastest: dict[int, float] = {}
        for round_ in range(WARMUP_ROUNDS):  # round 0 allocates (untimed); the fastest of the others seeds the
            for n in (1, cfg.max_batch):      # cost model: a swap warms up while the old version serves, and a
                t = time.perf_counter()      # pass slowed by that must not make admission refuse requests
                predict(warm[:n])
                if round_:
                    fastest[n] = min(fastest.get(n, math.inf), time.perf_counter() - t)
        batcher = MicroBatcher(predict, cfg.max_batch, cfg.max_wait_ms / 1e3, cfg.max_queue_images,
                               self.on_batch, max_queue_s=cfg.max_queue_ms / 1e3, decode_workers=self.decode_threads,
                               inline_s=INLINE_S if usable_cores() > 1 else ONE_CORE_INLINE_S)
        for n, seconds in fastest.items():
            batcher.cost.observe(n, seconds)
        self.metrics.model_info.labels(*self._info_labels(model)).set(1)
        return model, batcher

    def _info_labels(self, model) -> tuple[str, ...]:
        return (model.name, _model_version(model.manifest), model.backend, str(model.device), self.cfg.variant,
                ",".join(l["format"] for l in model.manifest["layers"]))

    def retired(self, served: Served) -> None:
        """A drained version leaves the g2g_model_info metric (unless a served version has the same labels)."""
        labels = self._info_labels(served.model)
        if all(self._info_labels(s.model) != labels for s in self.repository.served.values()):
            try:
                self.metrics.model_info.remove(*labels)
            except KeyError:
                pass

    @property
    def model_card(self) -> dict:
        """The default model: its name as served (the repository's; one export directory: its manifest's), the
        digest of its weights as version, and how it runs."""
        return self.card(self.served)

    def card(self, served: Served) -> dict:
        """``model_card`` of a given served version (``/classify`` looks its version up once per request)."""
        m = served.model
        return {"name": served.name, "version": _model_version(m.manifest), "backend": m.backend,
                "device": str(m.device), "variant": self.cfg.variant}

    def on_batch(self, size: int, seconds: float) -> None:
        self.metrics.batch_size.observe(size)
        self.metrics.inference_latency.observe(seconds)

    def observe_body(self, body) -> None:
        if body.payloads is not None and len(body.payloads) > 1:
            size = body.encoded_bytes / len(body.payloads)
            self.bytes_per_image = size if self.bytes_per_image == 0 else 0.9 * self.bytes_per_image + 0.1 * size

    async def serve_admitted(self, batcher: MicroBatcher, ticket: Ticket, start: float,
                             images_of: Callable[[], Awaitable[np.ndarray]],
                             busy: Callable[[Overloaded], Exception]) -> tuple[BatchResult, dict[str, float]]:
        """Read and decode an admitted request (``images_of``), queue it and run it: the one path of ``/classify``
        and v2 infer. The ticket is released whatever happens; a refusal is counted and raised as ``busy(e)``
        (each protocol has its error shape). Returns the result and the request's timing in ms."""
        try:
            images = await images_of()
            decoded = time.perf_counter()
            result = await ticket.submit(images)
        except Overloaded as e:
            self.metrics.rejected.inc()
            raise busy(e)
        finally:
            ticket.release()
            self.metrics.queue_depth.set(batcher.pending_images)
        latency = time.perf_counter() - start
        self.record(len(images), latency, decoded - start, result.queue_s, result.inference_s)
        return result, {"latency_ms": latency * 1e3, "decode_ms": (decoded - start) * 1e3,
                        "queue_ms": result.queue_s * 1e3, "inference_ms": result.inference_s * 1e3}

    def record(self, images: int, latency: float, decode: float, queue: float, inference: float) -> None:
        self.metrics.request_latency.observe(latency)
        self.metrics.decode_latency.observe(decode)
        self.live.append(time.perf_counter(), images, latency, decode, queue, inference)

    def close(self) -> None:
        self.decoder.shutdown(wait=False, cancel_futures=True)

    # -------------------------------------------------------------- calibration
    @property
    def _shared_file(self) -> Path | None:
        return Path(self.cfg.shared_dir) / CALIBRATION_FILE if self.cfg.shared_dir else None

    def claims_startup_calibration(self) -> bool:
        """With several workers only the first to claim it measures at start-up; the others report its result."""
        if self._shared_file is None:
            return True
        try:
            os.close(os.open(self._shared_file.with_suffix(".claim"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            return False

    @property
    def calibration(self) -> dict:
        shared = self._shared_file
        if shared is not None and shared.exists():
            try:
                return json.loads(shared.read_text())
            except ValueError:  # replaced atomically, so only a foreign file can be unreadable
                pass
        return self._calibration

    def _publish(self, result: dict) -> None:
        self._calibration = result
        if self._shared_file is not None:
            atomic_write_text(self._shared_file, json.dumps(result))

    def run_calibration(self) -> dict:
        """Time sparse vs dense at batch 1 and max batch with g2g-bench's measurement, weights and peak RSS."""
        with self._calibration_lock:  # one at a time: a second request waits, then measures afresh
            self._publish({"status": "running", "started": time.strftime("%Y-%m-%d %H:%M:%S")})
            try:
                self._publish(self._measure())
            except Exception as e:  # noqa: BLE001 - reported in /stats, never takes the server down
                self._publish({"status": "failed", "error": f"{type(e).__name__}: {e}"})
        return self._calibration

    def _measure(self) -> dict[str, Any]:
        cfg, current = self.cfg, self.served  # the default model's version now (a later swap does not move it)
        served = current.model
        models = {v: served if v == cfg.variant else self._load(v, current.path) for v in ("sparse", "dense")}
        batches = sorted({1, cfg.max_batch})
        device = served.device if cfg.backend in ("torch", "triton") else None
        rows = sparse_vs_dense({cfg.backend: (models["sparse"], models["dense"])}, batches, cfg.calibration_seconds,
                               device=device)
        del models
        timing = {f"batch_{r['batch']}": {"sparse_p50_ms": r["sparse"]["p50_ms"], "dense_p50_ms": r["dense"]["p50_ms"],
                                          "sparse_p99_ms": r["sparse"]["p99_ms"], "dense_p99_ms": r["dense"]["p99_ms"],
                                          "speedup": r["speedup"]} for r in rows}
        sizes = served.manifest["sizes"]
        result: dict[str, Any] = {
            "status": "done", "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"), "pid": os.getpid(),
            "threads": cfg.threads or 1, "latency": timing,
            "weights": {"sparse_bytes": sizes["stored_weight_bytes"], "dense_bytes": sizes["dense_weight_bytes"],
                        "ratio": sizes["stored_weight_bytes"] / sizes["dense_weight_bytes"]},
        }
        # the torch-based probe only where torch is installed (a fresh process; a [serve]-only install has none)
        if cfg.memory_probe and importlib.machinery.PathFinder.find_spec("torch") is not None:
            mem = {v: peak_memory(str(current.path), cfg.backend, v, cfg.max_batch, str(served.device), cfg.threads or 1)
                   for v in ("sparse", "dense")}
            result["resident_memory"] = {"sparse_peak_bytes": mem["sparse"]["vmhwm_bytes"],
                                         "dense_peak_bytes": mem["dense"]["vmhwm_bytes"],
                                         "saving_bytes": mem["dense"]["vmhwm_bytes"] - mem["sparse"]["vmhwm_bytes"]}
        if cfg.memory_probe:
            slim = self._slim_memory(Path(current.path))
            if slim is not None:
                result["resident_memory_slim"] = slim
        install = load_summary()  # measured by make install-size; never measured here (it takes minutes)
        if install is not None:
            result["install_size"] = {"bytes": {i["name"]: i["total_bytes"] for i in install["installs"]},
                                      "ratio_to_" + install["reference"]: install["ratios"]}
        b1, bm = timing["batch_1"], timing[f"batch_{cfg.max_batch}"]
        result["summary"] = (
            f"on this machine the sparse model is {b1['speedup']:.2f}x as fast as its dense twin at batch 1 and "
            f"{bm['speedup']:.2f}x at batch {cfg.max_batch}, and stores {result['weights']['ratio']:.2f}x the "
            f"weight bytes" + (f"; a fresh process serving it peaks {result['resident_memory']['saving_bytes'] / 2**20:.1f}"
                               f" MiB lower" if "resident_memory" in result else "")
            + (f"; without torch (a [serve] install) {result['resident_memory_slim']['saving_bytes'] / 2**20:.1f} MiB "
               f"lower ({result['resident_memory_slim']['ratio']:.2f}x the dense twin's peak)"
               if "resident_memory_slim" in result else ""))
        return result

    def _slim_memory(self, path: Path) -> dict | None:
        """Peak RSS of fresh sparse and dense processes with torch blocked, as in a ``[serve]``-only install (the
        served backend where it is a slim one, else onnxruntime); None for a model.pt, which needs torch."""
        cfg = self.cfg
        if not path.is_dir():
            return None
        backend = cfg.backend if cfg.backend in SLIM_BACKENDS else "onnxruntime"
        mem = {v: peak_memory(str(path), backend, v, cfg.max_batch, "cpu", cfg.threads or 1, slim=True)["vmhwm_bytes"]
               for v in ("sparse", "dense")}
        return {"backend": backend, "sparse_peak_bytes": mem["sparse"], "dense_peak_bytes": mem["dense"],
                "saving_bytes": mem["dense"] - mem["sparse"], "ratio": mem["sparse"] / mem["dense"]}

    # -------------------------------------------------------------- live figures
    def live_stats(self) -> dict:
        """End-to-end figures of the requests served (in this process), next to the forward passes they needed."""
        arr = self.live.rows()
        if not len(arr):
            return {"requests": 0}
        data = arr

        def pct(col: int) -> dict:
            lat = Latency.of(arr[:, col].tolist())
            return {"p50": lat.p50_ms, "p95": lat.p95_ms, "p99": lat.p99_ms}
        span = arr[-1, 0] - arr[0, 0]
        images = int(arr[:, 1].sum())
        out = {"requests": len(data), "images": images,
               "latency_ms": pct(2), "decode_ms": pct(3), "queue_ms": pct(4), "inference_ms": pct(5),
               "note": "latency is end to end inside the server (body read, decode, queue, forward pass, answer); "
                       "inference is the batched forward pass the request was part of"}
        if span > 0 and len(data) > 1:
            out["throughput"] = {"requests_per_s": float((len(data) - 1) / span),
                                 "images_per_s": float((images - arr[0, 1]) / span)}
        return out
