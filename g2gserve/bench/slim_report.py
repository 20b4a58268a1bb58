"""``python -m g2gserve.bench.slim_report DEMO_EXPORT --wide WIDE_EXPORT --out docs``: issue 18's targets, measured.

1. The real ``g2g-serve`` (``python -m server.cli``) in a process where torch cannot be imported
   (``g2gserve.bench.notorch``), per slim backend, serving the demo export: 4 loopback clients send ``--requests``
   requests of a fixed mix (9 single-PNG requests, then one 16-PNG multipart request); the server's VmRSS is
   sampled 100 times along the way and its VmHWM read at the end. Start-up calibration is off (it would load the
   dense twin into the served process).
2. Peak RSS (VmHWM) of fresh slim processes (``memprobe --slim``: load, warm up, fixed request mix) for the
   sparse model and its dense twin, demo and wide (hidden 4096, ``python -m g2gserve.bench.wide``) export; the
   same with torch imported, for the demo model, as today's figure.
3. The ``[serve]`` install against the full one, from ``make install-size``'s JSON.

Writes OUT/slim.json, OUT/slim.md (machine named, every target met or missed) and OUT/slim.png.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

from g2gserve.bench.install_size import DEFAULT_JSON, load_summary
from g2gserve.bench.measure import machine_info, peak_memory
from g2gserve.bench.memprobe import SLIM_BACKENDS, vm_hwm_bytes, vm_rss_bytes
from g2gserve.fileio import atomic_write_text
from server.service import LIVE_WINDOW

MIB = 2**20
PEAK_TARGET = 150 * MIB
FLAT_TARGET = 0.02  # max / min - 1 of the RSS samples after the first tenth of the requests
RATIO_TARGETS = {"demo": 0.85, "wide": 0.5}
INSTALL_TARGET = 0.1
CLIENTS = 4
MIX = 10  # every MIX-th request carries 16 images, the others one


def _bodies() -> list[bytes]:
    """The raw HTTP requests of one round of the mix (reusing g2g-bench's serving client and test-like images)."""
    from server.servebench import BOUNDARY, _garment, _multipart, _png
    pngs = [_png(_garment(i)) for i in range(16)]
    single = [(png, "image/png") for png in pngs[:MIX - 1]]
    return single + [(_multipart(pngs), f"multipart/form-data; boundary={BOUNDARY}")]


async def _drive(port: int, pid: int, requests: int) -> dict:
    """``requests`` requests from CLIENTS keep-alive clients; the server's VmRSS every 1% of them."""
    from server.servebench import _exchange, _raw
    raws = [_raw("POST", "/classify?top_k=1", port, body, ctype) for body, ctype in _bodies()]
    every = max(1, requests // 100)
    state = {"sent": 0, "done": 0, "errors": 0}
    trace: list[tuple[int, int]] = []

    async def client() -> None:
        conn: list = []
        while state["sent"] < requests:
            i = state["sent"]
            state["sent"] += 1
            status = await _exchange("127.0.0.1", port, raws[i % MIX], conn)
            state["errors"] += status != 200
            state["done"] += 1
            if state["done"] % every == 0:
                trace.append((state["done"], vm_rss_bytes(pid)))
        if conn:
            conn[1].close()
    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return {"requests": state["done"], "errors": state["errors"], "rss_trace": trace}


def serve_run(model: Path, backend: str, requests: int, workdir: Path) -> dict:
    """Peak and sampled RSS of a torch-free ``g2g-serve`` process over ``requests`` requests of the mix."""
    from server.servebench import Server, _run
    args = ["g2gserve.bench.notorch", "server.cli", str(model), "--backend", backend, "--threads", "1",
            "--no-calibrate", "--log-level", "warning"]
    with Server(args, workdir / f"slim-serve-{backend}.log") as server:
        pid = server.proc.pid
        ready_rss = vm_rss_bytes(pid)
        t = time.perf_counter()
        out = _run(_drive(server.port, pid, requests))
        out["seconds"] = time.perf_counter() - t
        out["vmhwm_bytes"] = vm_hwm_bytes(pid)
        out["ready_rss_bytes"] = ready_rss
    tail = [(n, rss) for n, rss in out["rss_trace"] if n > requests // 10]
    out["flat_spread"] = (max(r for _, r in tail) / min(r for _, r in tail) - 1) if tail else None
    out["growth_bytes_per_request"] = (tail[-1][1] - tail[0][1]) / (tail[-1][0] - tail[0][0]) if len(tail) > 1 else None
    return {"backend": backend, **out}


def probes(models: dict[str, Path], backends: list[str], batch: int) -> list[dict]:
    """Fresh-process peaks: slim for every model, backend and variant; with torch for the demo model."""
    rows = []
    if "fused" in backends:  # compile once, discarded: numba caches the machine code on disk, so a deployed server
        # loads it after its first start; without this the first probe's peak would include LLVM compiling
        peak_memory(str(models["demo"]), "fused", "sparse", batch, slim=True)
    for name, path in models.items():
        for backend in backends:
            for slim in (True, False) if name == "demo" else (True,):
                for variant in ("sparse", "dense"):
                    m = peak_memory(str(path), backend, variant, batch, slim=slim)
                    rows.append({"model": name, "backend": backend, "slim": slim, "variant": variant,
                                 "vmhwm_bytes": m["vmhwm_bytes"], "torch_imported": m["torch_imported"]})
    return rows


def targets(result: dict) -> list[dict]:
    out = []

    def add(name: str, ok: bool | None, measured: str) -> None:
        out.append({"target": name, "met": ok, "measured": measured})
    for r in result["serve"]:
        add(f"slim g2g-serve ({r['backend']}, demo) peak RSS after warm-up and {r['requests']:,} requests "
            f"<= {PEAK_TARGET / MIB:.0f} MiB", r["vmhwm_bytes"] <= PEAK_TARGET and r["errors"] == 0,
            f"{r['vmhwm_bytes'] / MIB:.1f} MiB, {r['errors']} non-200")
        spread = r["flat_spread"]
        add(f"RSS flat within {FLAT_TARGET:.0%} over the last 90% of the requests ({r['backend']})",
            None if spread is None else spread <= FLAT_TARGET,
            "too few samples" if spread is None else f"max/min - 1 = {spread:.2%}")
    by = {(r["model"], r["backend"], r["slim"], r["variant"]): r["vmhwm_bytes"] for r in result["probes"]}
    for model in result["models"]:
        for backend in result["backends"]:
            ratio = by[model, backend, True, "sparse"] / by[model, backend, True, "dense"]
            add(f"peak RSS sparse / dense, slim, {model} model, {backend} <= {RATIO_TARGETS[model]}",
                ratio <= RATIO_TARGETS[model], f"{ratio:.3f}x")
    inst = result.get("install_size")
    if inst and inst.get("ratios"):
        name, ratio = next(iter(inst["ratios"].items()))
        add(f"[{name}] install <= {INSTALL_TARGET:.0%} of the {inst['reference']} install", ratio <= INSTALL_TARGET,
            f"{ratio:.3f}x")
    else:
        add(f"[serve] install <= {INSTALL_TARGET:.0%} of the full install", None,
            "not measured (make install-size writes docs/install-size.json)")
    return out


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Slim serving (no torch): what sparsity saves in the whole process", "",
             f"Generated by `{result['command']}` on {m['cpu']} ({m.get('isa', '?')}, {m['cores']} cores), "
             f"Python {m['python']}, onnxruntime {m.get('onnxruntime')}, numba {m.get('numba')}, "
             f"{result['finished']}. Regenerate with `make slim-report` (needs `make demo`'s export; builds the "
             "hidden-4096 model with `python -m g2gserve.bench.wide` and the `[serve]`-only venv when missing).", "",
             "A serving install without torch: `pip install 'g2gserve[serve]'` (numpy, onnxruntime, FastAPI, "
             "uvicorn, Pillow, safetensors, numba for the fused backend), then `g2g-serve EXPORT_DIR --backend "
             "onnxruntime` (or `fused`). Only the `torch` backend, CUDA and reading a `model.pt` need torch; they say "
             "so when it is missing. `GET /stats` reports the same figures for the served export: "
             "`calibration.resident_memory_slim` (fresh torch-free sparse and dense processes) next to "
             "`calibration.resident_memory` (with torch, where installed), and `calibration.install_size` where "
             "`make install-size` wrote `docs/install-size.json`.", "",
             "## Targets (issue 18)", "", "| target | measured | |", "|---|---|---|"]
    for t in result["targets"]:
        verdict = "not measured" if t["met"] is None else ("**met**" if t["met"] else "**missed**")
        lines.append(f"| {t['target']} | {t['measured']} | {verdict} |")
    lines += ["", "## The served process", "",
              f"`g2g-serve` with torch blocked (`python -m g2gserve.bench.notorch server.cli ...`), `--threads 1 "
              f"--no-calibrate`, {CLIENTS} keep-alive loopback clients, a fixed mix of {MIX - 1} single-PNG requests "
              "and one 16-PNG request.", "",
              "| backend | requests | non-200 | seconds | RSS when ready | peak RSS (VmHWM) | RSS spread, last 90% "
              "| RSS growth per request, last 90% |", "|---|---|---|---|---|---|---|---|"]
    for r in result["serve"]:
        spread = "n/a" if r["flat_spread"] is None else f"{r['flat_spread']:.2%}"
        growth = r.get("growth_bytes_per_request")
        lines.append(f"| {r['backend']} | {r['requests']:,} | {r['errors']} | {r['seconds']:.1f} | "
                     f"{r['ready_rss_bytes'] / MIB:.1f} MiB | {r['vmhwm_bytes'] / MIB:.1f} MiB | {spread} | "
                     f"{'n/a' if growth is None else f'{growth:.0f} B'} |")
    lines += ["", f"The server keeps the figures of its last {LIVE_WINDOW:,} requests for `/stats` in a preallocated "
              "ring (`server.service.LiveWindow`), so recording a request allocates nothing; what growth remains "
              "in the last column is the allocator's and the libraries' own."]
    lines += ["", "## Sparse vs dense: peak RSS of fresh processes", "",
              f"`memprobe` (load, warm up at batch 1 and {result['batch']}, a fixed request mix); slim = torch "
              "blocked, as in a `[serve]`-only install. The fused backend's kernel is compiled once before (numba "
              "caches it on disk), so no figure includes compiling it.", "",
              "| model | dense weights | backend | mode | sparse | dense | sparse / dense |", "|---|---|---|---|---|---|---|"]
    by = {(r["model"], r["backend"], r["slim"], r["variant"]): r["vmhwm_bytes"] for r in result["probes"]}
    for model, backend, slim in dict.fromkeys((r["model"], r["backend"], r["slim"]) for r in result["probes"]):
        s, d = by[model, backend, slim, "sparse"], by[model, backend, slim, "dense"]
        lines.append(f"| {model} | {result['dense_weight_bytes'][model] / MIB:.1f} MiB | {backend} | "
                     f"{'slim (no torch)' if slim else 'torch imported'} | {s / MIB:.1f} MiB | {d / MIB:.1f} MiB | "
                     f"{s / d:.3f}x |")
    inst = result.get("install_size")
    if inst:
        lines += ["", "## Install size", "", "| install | venv | MiB |", "|---|---|---|"]
        lines += [f"| {i['name']} | `{i['venv']}` | {i['total_bytes'] / MIB:,.0f} |" for i in inst["installs"]]
    lines += ["", "![peak RSS and the served process's RSS over the requests](slim.png)", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    from g2gserve.plotting import plt, save_png
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.2))
    rows = [r for r in result["probes"] if r["slim"]]
    keys = list(dict.fromkeys((r["model"], r["backend"]) for r in rows))
    by = {(r["model"], r["backend"], r["variant"]): r["vmhwm_bytes"] / MIB for r in rows}
    xs = range(len(keys))
    ax0.bar([x - 0.2 for x in xs], [by[k + ("sparse",)] for k in keys], 0.4, label="sparse")
    ax0.bar([x + 0.2 for x in xs], [by[k + ("dense",)] for k in keys], 0.4, label="dense twin")
    ax0.set_xticks(list(xs), [f"{m}\n{b}" for m, b in keys])
    ax0.set(ylabel="peak RSS (MiB)", title="fresh slim process (no torch)")
    ax0.legend()
    for r in result["serve"]:
        ax1.plot([n for n, _ in r["rss_trace"]], [v / MIB for _, v in r["rss_trace"]], label=r["backend"])
    ax1.axhline(PEAK_TARGET / MIB, color="k", lw=0.8, ls="--", label="target peak")
    ax1.set(xlabel="requests served", ylabel="RSS (MiB)", title="slim g2g-serve, demo model", ylim=(0, None))
    ax1.legend()
    for ax in (ax0, ax1):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m g2gserve.bench.slim_report", description=__doc__.split("\n")[0])
    p.add_argument("demo", type=Path, help="the demo export directory (make demo: runs/demo/export)")
    p.add_argument("--wide", type=Path, default=Path("runs/wide/export"),
                   help="the hidden-4096 export; built with python -m g2gserve.bench.wide when missing")
    p.add_argument("--requests", type=int, default=10_000, help="requests through the served process")
    p.add_argument("--backends", default=",".join(SLIM_BACKENDS))
    p.add_argument("--batch", type=int, default=64, help="the large batch of the fresh-process probes")
    p.add_argument("--install-size", type=Path, default=DEFAULT_JSON, help="make install-size's JSON")
    p.add_argument("--out", type=Path, default=Path("docs"))
    args = p.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    if not backends or any(b not in SLIM_BACKENDS for b in backends):
        p.error(f"--backends: choose among {', '.join(SLIM_BACKENDS)}")
    if not (args.demo / "manifest.json").exists():
        p.error(f"{args.demo}: not an export directory (make demo writes runs/demo/export)")
    if not (args.wide / "manifest.json").exists():
        if args.wide.name != "export":
            p.error(f"--wide {args.wide}: no export there; name DIR/export to have it built (model.pt in DIR)")
        from g2gserve.bench.wide import build_wide
        print(f"building the wide model into {args.wide.parent}", file=sys.stderr)
        build_wide(args.wide.parent)
    models = {"demo": args.demo, "wide": args.wide}
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {"command": "python -m g2gserve.bench.slim_report " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "machine": machine_info(), "models": list(models), "backends": backends, "batch": args.batch,
                    "dense_weight_bytes": {k: json.loads((v / "manifest.json").read_text())["sizes"]["dense_weight_bytes"]
                                           for k, v in models.items()}}
    print("probing fresh processes", file=sys.stderr)
    result["probes"] = probes(models, backends, args.batch)
    result["serve"] = []
    logs = Path(tempfile.mkdtemp(prefix="g2g-slim-report-"))  # server logs, kept for a failed start
    for backend in backends:
        print(f"serving {args.requests} requests ({backend}); server log in {logs}", file=sys.stderr)
        result["serve"].append(serve_run(args.demo, backend, args.requests, logs))
    result["install_size"] = load_summary(args.install_size)
    result["targets"] = targets(result)
    result["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    atomic_write_text(args.out / "slim.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(args.out / "slim.md", markdown(result))
    plot(result, args.out / "slim.png")
    print(args.out / "slim.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
