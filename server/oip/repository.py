"""A model repository: several models by name, one served version each, swapped without downtime.

``DIR/<name>/<version>/`` are export directories (``g2g-export``), versions are positive integers and the
highest one is served (Triton's default "latest" policy). A single export directory (or ``model.pt``) is a
repository of one model, version 1. Loading a model that already serves another version is a *swap*: the new version
is loaded and warmed up (both batch sizes the batcher uses) while the old one keeps answering, then new
requests go to the new one, and the old one is drained (requests admitted into it finish) and dropped.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from g2gserve.runtime import InferenceModel

from .protocol import OIPError


class Batcher(Protocol):
    """What the repository needs of server.batching.MicroBatcher. A request admitted into a batcher holds it:
    ``drain`` returns once every admitted request is answered."""

    def start(self) -> None: ...
    async def drain(self, timeout: float = 30.0) -> None: ...


@dataclass
class Served:
    """One loaded version: its model and its batcher."""

    name: str
    version: str
    path: Path
    model: InferenceModel
    batcher: Batcher


def discover(root: Path) -> dict[str, dict[str, Path]]:
    """``{name: {version: path}}`` for ``root/<name>/<version>/manifest.json``; other entries are ignored."""
    found: dict[str, dict[str, Path]] = {}
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        versions = {v.name: v for v in model_dir.iterdir()
                    if v.is_dir() and v.name.isdigit() and int(v.name) > 0 and (v / "manifest.json").is_file()}
        if versions:
            found[model_dir.name] = versions
    return found


def _single_name(path: Path) -> str:
    """The name a lone export directory (its manifest's) or model.pt (as runtime.load names it) is served under."""
    if path.is_dir():
        try:
            name = json.loads((path / "manifest.json").read_text()).get("name")
        except (OSError, ValueError, AttributeError):  # loading it will say what is wrong
            name = None
        return name if isinstance(name, str) and name else path.name
    return path.parent.name or path.stem


def latest(versions: dict[str, Path]) -> str:
    return max(versions, key=int)


class ModelRepository:
    """Models by name: discovery, load (or swap), unload."""

    def __init__(self, prepare: Callable[[Path], tuple[InferenceModel, Batcher]], root: Path | None = None,
                 single: Path | None = None, retired: Callable[[Served], None] | None = None):
        """``prepare(export_dir)`` loads and warms a model and makes its (not yet started) batcher; it runs in a
        worker thread while the served version keeps answering. ``retired(served)`` is told of a drained version."""
        if (root is None) == (single is None):
            raise ValueError("give a repository directory or a single export directory")
        self.prepare, self.retired = prepare, retired
        self.root, self.single = root, single
        self.served: dict[str, Served] = {}
        self.state: dict[tuple[str, str], tuple[str, str]] = {}  # (name, version) -> (state, reason) when not plain
        self._locks: dict[str, asyncio.Lock] = {}
        self._single_name: str | None = None

    # -------------------------------------------------------------- what is on disk
    def available(self) -> dict[str, dict[str, Path]]:
        if self.single is not None:
            if self._single_name is None:
                self._single_name = _single_name(self.single)
            return {self._single_name: {"1": self.single}}
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: no such model repository")
        return discover(self.root)

    def index(self) -> list[dict]:
        """``/v2/repository/index``: every version on disk with its state (READY, UNAVAILABLE, LOADING...)."""
        available = self.available()
        versions = {(n, v) for n, vs in available.items() for v in vs}
        versions |= {(s.name, s.version) for s in self.served.values()} | set(self.state)
        rows = []
        for name, version in sorted(versions, key=lambda nv: (nv[0], int(nv[1]))):
            served = self.served.get(name)
            if served is not None and served.version == version:
                state, reason = "READY", "" if version in available.get(name, {}) else "removed from disk; still served"
            elif (name, version) in self.state:
                state, reason = self.state[name, version]
            else:
                state, reason = "UNAVAILABLE", f"version {served.version} is served" if served else "not loaded"
            rows.append({"name": name, "version": version, "state": state, "reason": reason})
        return rows

    # -------------------------------------------------------------- serving
    def get(self, name: str, version: str | None = None) -> Served:
        served = self.served.get(name)
        if served is None:
            raise OIPError(404, f"model {name!r} is not loaded" if self._on_disk(name)
                           else f"unknown model {name!r}")
        if version not in (None, "", served.version):
            raise OIPError(404, f"version {version!r} of model {name!r} is not loaded (version {served.version} is)")
        return served

    def _on_disk(self, name: str) -> bool:
        try:
            return name in self.available()
        except OSError:
            return False

    # -------------------------------------------------------------- load / swap / unload
    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def load(self, name: str) -> Served:
        """Serve the latest version of ``name``: load and warm it, switch, then drain the old version."""
        async with self._lock(name):
            versions = self.available().get(name)
            if not versions:
                raise OIPError(404, f"no model {name!r} in the repository")
            version = latest(versions)
            current = self.served.get(name)
            if current is not None and current.version == version:
                return current
            self.state[name, version] = ("LOADING", "loading and warming up")
            try:
                model, batcher = await asyncio.to_thread(self.prepare, versions[version])
            except Exception as e:  # noqa: BLE001 - a bad export on disk is the caller's 400, never a 500
                self.state[name, version] = ("UNAVAILABLE", f"failed to load: {e}")
                raise OIPError(400, f"model {name!r} version {version} cannot be loaded: {e}") from e
            batcher.start()
            new = Served(name, version, versions[version], model, batcher)
            self.served[name] = new  # from here on, new requests hold the new version
            del self.state[name, version]
            if current is not None:
                self.state[name, current.version] = ("UNLOADING", "draining in-flight requests")
                try:
                    await self._retire(current)
                finally:
                    del self.state[name, current.version]
            return new

    async def unload(self, name: str) -> None:
        async with self._lock(name):
            current = self.served.pop(name, None)
            if current is None:
                raise OIPError(404, f"model {name!r} is not loaded")
            self.state[name, current.version] = ("UNLOADING", "draining in-flight requests")
            try:
                await self._retire(current)
            finally:
                self.state[name, current.version] = ("UNAVAILABLE", "unloaded")

    async def _retire(self, old: Served) -> None:
        """Drain ``old``: requests admitted into its batcher before the switch finish there; then let it go."""
        await old.batcher.drain()
        if self.retired is not None:
            self.retired(old)
        old.model = old.batcher = None  # type: ignore[assignment]  # the last reference: freed now, no gc pause

    async def load_all(self) -> list[str]:
        """Load every model at start-up; one that fails is left UNAVAILABLE with its reason (see the index)."""
        failed = []
        for name in self.available():
            try:
                await self.load(name)
            except OIPError as e:
                failed.append(f"{name}: {e}")
        return failed

    async def close(self) -> None:
        for name in list(self.served):
            await self.unload(name)
