"""g2g-bench MODEL: latency and memory of the sparse model against its dense twin, measured side by side."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from g2gserve.bench.measure import (CHUNK_SECONDS, Latency, interleaved, machine_info, ort_node_profile,
                                    pairwise_speedup, peak_memory, pin_threads, sparse_vs_dense)
from g2gserve.bench.peak import gemm_peak, model_macs, packed_of, stream_ceiling
from g2gserve.bench.reduced import REDUCED, load_bench_model, precision_of
from g2gserve.model.config import ModelConfig
from g2gserve.bench.install_size import load_summary
from g2gserve.bench.memprobe import SLIM_BACKENDS
from g2gserve.bundle import read_bundle
from g2gserve.fileio import atomic_write_text
from g2gserve.formats import densify, pack_model
from g2gserve.model.g2gnet import build_model
from g2gserve.runtime import BACKENDS, CPU_BACKENDS, DTYPES
from g2gserve.runtime.torch_backend import PackedModule

SWEEP_SPARSITIES = (0.5, 0.75, 0.875, 0.9375)


def _csv(kind):
    def parse(text: str):
        try:
            return [kind(v) for v in text.split(",") if v]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return parse


def _onnx_bytes(model_path: Path, manifest: dict) -> dict:
    sizes = manifest.get("sizes", {})
    if "model_onnx_bytes" in sizes:
        return {"model_onnx_bytes": sizes["model_onnx_bytes"], "dense_onnx_bytes": sizes["dense_onnx_bytes"]}
    from g2gserve.model.checkpoint import load_model
    from g2gserve.export import build_artifacts
    model, ckpt = load_model(model_path)
    art = build_artifacts(model, ckpt)
    return {"model_onnx_bytes": art.model_onnx.ByteSize(), "dense_onnx_bytes": art.dense_onnx.ByteSize()}


def _throughput_lines(result: dict) -> list[str]:
    """G MAC/s at p50 (the multiply-adds each model needs, zero padding not counted) and, with a peak measured
    in the same run, the fraction of it; plus which fused micro-kernel ran."""
    if "macs_per_image" not in result:
        return []
    macs, peak = result["macs_per_image"], result.get("peak")
    lines = ["", f"Multiply-adds per image: sparse {macs['sparse']:,}, dense {macs['dense']:,} "
                 f"({macs['dense'] / macs['sparse']:.2f}x)."
             + (f" Peak: the best n^3 float32 GEMM (onnxruntime MatMul, n = {', '.join(map(str, peak['sizes']))}) "
                f"on {peak['threads']} thread(s), {peak['gmacs']:.1f} G MAC/s at n = {peak['size']}." if peak else ""),
             "",
             "| backend | batch | sparse G MAC/s | dense G MAC/s |" + (" sparse / peak | dense / peak |" if peak else ""),
             "|---|---|---|---|" + ("---|---|" if peak else "")]
    for r in result["runs"]:
        line = f"| {r['backend']} | {r['batch']} | {r['gmacs_sparse']:.1f} | {r['gmacs_dense']:.1f} |"
        if peak:
            line += f" {r['gmacs_sparse'] / peak['gmacs']:.0%} | {r['gmacs_dense'] / peak['gmacs']:.0%} |"
        lines.append(line)
    lines += _stream_lines(result)
    for backend, k in result.get("fused_kernel", {}).items():
        lines += ["", f"{backend} micro-kernel: {k['isa']} ({k['vector_floats']}-float vectors, {k['tile']}, "
                      f"{k['precision']}), {k['threads']} thread(s), LLVM CPU {k['cpu']}."]
    return lines


def _stream_lines(result: dict) -> list[str]:
    """At batch 1, on one thread: each fp32 backend's forward against the time reading its weights alone takes
    (``stream_ceiling``, measured in the same run in the same strict alternation)."""
    st = result.get("stream")
    rows = [r for r in result["runs"] if r["batch"] == 1 and r["precision"] == "fp32"]  # weights as stored
    if not st or not rows or result.get("threads", 1) != 1:
        return []
    lines = ["", f"Weights' stream at batch 1 (every weight is read once per forward): reading a buffer of the sparse "
                 f"model's {st['sparse_bytes']:,} weight bytes and one of the dense twin's {st['dense_bytes']:,} in "
                 f"strict alternation, nothing computed, takes {st['sparse_s'] * 1e3:.3f} / {st['dense_s'] * 1e3:.3f} ms "
                 f"({st['sparse_gbs']:.0f} / {st['dense_gbs']:.0f} GB/s; medians of {st['calls']:,}): "
                 f"**{st['ratio']:.2f}x** apart, the ratio a purely stream-bound pair could reach here. Each forward "
                 "against that time (100%: as fast as reading its weights alone):", "",
             "| backend | batch | sparse p50 (ms) | dense p50 (ms) | sparse: stream / p50 | dense: stream / p50 |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        s_ms, d_ms = r["sparse"]["p50_ms"], r["dense"]["p50_ms"]
        lines.append(f"| {r['backend']} | 1 | {s_ms:.3f} | {d_ms:.3f} | {st['sparse_s'] * 1e3 / s_ms:.0%} | "
                     f"{st['dense_s'] * 1e3 / d_ms:.0%} |")
    return lines


def bench_model(path: Path, backends: list[str], batches: list[int], device: str, threads: int, seconds: float,
                memory: bool = True, run_length: int = 1, data_dir: Path | None = None) -> dict:
    pairs = {backend: tuple(load_bench_model(path, backend, v, device, threads, data_dir) for v in ("sparse", "dense"))
             for backend in backends}
    manifest = pairs[backends[0]][0].manifest
    packed = packed_of(path)
    macs = {"sparse": model_macs(packed), "dense": model_macs(densify(packed))}  # per image
    runs, best = [], []
    for n in tqdm(batches, desc="latency", unit="batch size"):
        at = sparse_vs_dense(pairs, [n], seconds, device=torch.device(device), run_length=run_length, log=tqdm.write)
        for r in at:  # G MAC/s at p50: the multiply-adds the model needs (no padding)
            r |= {"precision": precision_of(r["backend"]),
                  "gmacs_sparse": n * macs["sparse"] / r["sparse"]["p50_ms"] / 1e6,
                  "gmacs_dense": n * macs["dense"] / r["dense"]["p50_ms"] / 1e6}
        runs += at
        for group in dict.fromkeys("fp32" if r["precision"] == "fp32" else "reduced" for r in at):
            same = [r for r in at if (r["precision"] == "fp32") == (group == "fp32")]  # best vs best, same precision
            s = min(same, key=lambda r: r["sparse"]["p50_ms"])
            d = min(same, key=lambda r: r["dense"]["p50_ms"])
            best.append({"batch": n, "precision": group, "sparse_backend": s["backend"], "dense_backend": d["backend"],
                         "sparse_p50_ms": s["sparse"]["p50_ms"], "dense_p50_ms": d["dense"]["p50_ms"],
                         "speedup": d["dense"]["p50_ms"] / s["sparse"]["p50_ms"]})
    mem = []
    if memory:
        for backend in tqdm([b for b in backends if b in BACKENDS], desc="memory", unit="backend"):
            # slim: the same backend in a process where torch cannot be imported ([serve]-only install);
            # an export directory only (reading a model.pt needs torch)
            for slim in (False, True) if backend in SLIM_BACKENDS and device == "cpu" and path.is_dir() else (False,):
                for variant in ("sparse", "dense"):
                    m = peak_memory(str(path), backend, variant, max(batches), device, threads, slim=slim)
                    mem.append({"backend": backend, "variant": variant, "batch": max(batches), **m})
    sizes = dict(manifest.get("sizes", {})) | _onnx_bytes(path, manifest)
    kernels = {}
    if any(b.startswith("fused") for b in backends):  # which micro-kernel ran (imports numba: only then)
        from g2gserve.runtime.fused import describe
        kernels = {b: describe(precision=precision_of(b), threads=threads) for b in backends if b.startswith("fused")}
    return {"model": str(path), "layers": [{k: l[k] for k in ("name", "format", "density")} for l in manifest["layers"]],
            "runs": runs, "best": best, "memory": mem, "sizes": sizes, "macs_per_image": macs, "fused_kernel": kernels}


def sweep(batches: list[int], threads: int, seconds: float, device: str) -> list[dict]:
    """Random-initialised G2GNets (G = 16, 32x32 tiles) across sparsities, block and CSR vs dense (torch)."""
    rows, dev = [], torch.device(device)
    combos = [(g, s) for g in ("block", "edge") for s in SWEEP_SPARSITIES]
    for granularity, sparsity in tqdm(combos, desc="sweep", unit="model"):
        torch.manual_seed(0)
        model = build_model(ModelConfig(groups=16, sparsity=sparsity, granularity=granularity, block_size=32)).eval()
        packed = pack_model(model, "block" if granularity == "block" else "csr")
        sparse, dense = PackedModule(packed).to(dev), PackedModule(densify(packed)).to(dev)
        for n in batches:
            x = torch.randn(n, 1, 28, 28, device=dev)
            with torch.inference_mode():
                times = interleaved({"sparse": lambda: sparse(x), "dense": lambda: dense(x)}, seconds=seconds,
                                    device=dev)
            rows.append({"format": packed.layers[0].format, "sparsity": sparsity, "batch": n,
                         "sparse_p50_ms": Latency.of(times["sparse"]).p50_ms,
                         "dense_p50_ms": Latency.of(times["dense"]).p50_ms,
                         "speedup": pairwise_speedup(times["sparse"], times["dense"])})
    return rows


def break_even(rows: list[dict], fmt: str, batch: int) -> str:
    """Sparsity at which ``fmt`` starts to beat dense, linearly interpolated between measured points."""
    pts = sorted((r["sparsity"], r["speedup"]) for r in rows if r["format"] == fmt and r["batch"] == batch)
    if not pts:
        return "n/a"
    if pts[0][1] >= 1:
        return f"<= {pts[0][0]:.2%}"
    for (s0, v0), (s1, v1) in zip(pts, pts[1:]):
        if v0 < 1 <= v1:
            return f"{s0 + (1 - v0) * (s1 - s0) / (v1 - v0):.1%}"
    return f"> {pts[-1][0]:.2%}"


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"Machine: {m['cpu']} ({m.get('isa', '?')}, {m['cores']} cores{', GPU ' + m['gpu'] if m.get('gpu') else ''}), "
             f"device {result['device']}, {result['threads']} thread(s), torch {m['torch']}, "
             f"onnxruntime {m.get('onnxruntime')}, numba {m.get('numba')}. Command: `{result['command']}`", ""]
    rl = result.get("run_length", 1)
    lines += ["Timing: strict A B A B alternation (every call runs after the other model's; cold caches)." if rl == 1
              else f"Timing: runs of {rl} warm calls per model between switches (the first call after a switch "
                   "is not counted).",
              f"The backends take turns in chunks of ~{CHUNK_SECONDS} s per batch size, so drift hits all of them alike.",
              ""]
    if "runs" in result:
        lines += ["| backend | batch | sparse p50 / p95 / p99 (ms) | dense p50 / p95 / p99 (ms) | speedup (pairwise median) | sparse img/s | dense img/s |",
                  "|---|---|---|---|---|---|---|"]
        for r in result["runs"]:
            s, d = r["sparse"], r["dense"]
            lines.append(f"| {r['backend']} | {r['batch']} | {s['p50_ms']:.3f} / {s['p95_ms']:.3f} / {s['p99_ms']:.3f} | "
                         f"{d['p50_ms']:.3f} / {d['p95_ms']:.3f} / {d['p99_ms']:.3f} | {r['speedup']:.2f}x | "
                         f"{r['throughput_sparse']:,.0f} | {r['throughput_dense']:,.0f} |")
        lines += ["", "Best sparse backend vs best dense backend (p50), at the same precision (fp32; or bf16/int8 "
                      "against each other):", "",
                  "| batch | precision | sparse (backend) | dense (backend) | speedup |", "|---|---|---|---|---|"]
        for b in result["best"]:
            lines.append(f"| {b['batch']} | {b.get('precision', 'fp32')} | {b['sparse_p50_ms']:.3f} ms "
                         f"({b['sparse_backend']}) | {b['dense_p50_ms']:.3f} ms ({b['dense_backend']}) | "
                         f"**{b['speedup']:.2f}x** |")
        lines += _throughput_lines(result)
        sz = result["sizes"]
        lines += ["", "| size | sparse | dense | ratio |", "|---|---|---|---|",
                  f"| stored weights | {sz['stored_weight_bytes']:,} B | {sz['dense_weight_bytes']:,} B | "
                  f"{sz['stored_weight_bytes'] / sz['dense_weight_bytes']:.3f}x |",
                  f"| ONNX file | {sz['model_onnx_bytes']:,} B | {sz['dense_onnx_bytes']:,} B | "
                  f"{sz['model_onnx_bytes'] / sz['dense_onnx_bytes']:.3f}x |"]
        by = {(r["backend"], r.get("slim", False), r["variant"]): r for r in result["memory"]}
        for backend, slim in dict.fromkeys((r["backend"], r.get("slim", False)) for r in result["memory"]):
            s, d = by[backend, slim, "sparse"], by[backend, slim, "dense"]
            mode = f"{backend}, slim (no torch)" if slim else backend
            lines.append(f"| peak RSS, fresh process, {mode}, batch {s['batch']} | {s['vmhwm_bytes'] / 2**20:.1f} MiB | "
                         f"{d['vmhwm_bytes'] / 2**20:.1f} MiB | {s['vmhwm_bytes'] / d['vmhwm_bytes']:.3f}x |")
            if "cuda_max_allocated_bytes" in s:
                lines.append(f"| CUDA max allocated, {backend} | {s['cuda_max_allocated_bytes']:,} B | "
                             f"{d['cuda_max_allocated_bytes']:,} B | "
                             f"{s['cuda_max_allocated_bytes'] / d['cuda_max_allocated_bytes']:.3f}x |")
    if result.get("install_size"):
        inst = result["install_size"]
        lines += ["", "Install size (`make install-size`): " + ", ".join(
            f"`[{i['name']}]` {i['total_bytes'] / 2**20:,.0f} MiB" for i in inst["installs"]) + "; " + ", ".join(
            f"`[{name}]` is {ratio:.3f}x `[{inst['reference']}]`" for name, ratio in inst["ratios"].items()) + "."]
    if result.get("profile"):
        lines += ["", "onnxruntime node profile (median per node, summed by op type; overhead = run minus node kernels):", "",
                  "| graph | batch | nodes | run (us) | node kernels (us) | overhead (us) | by op type (us) |",
                  "|---|---|---|---|---|---|---|"]
        for r in result["profile"]:
            ops = ", ".join(f"{op} {us:.0f}" for op, us in r["by_op_us"].items())
            lines.append(f"| {r['graph']} | {r['batch']} | {r['nodes']} | {r['run_us']:.0f} | {r['nodes_us']:.0f} | "
                         f"{r['run_us'] - r['nodes_us']:.0f} | {ops} |")
    if result.get("sweep"):
        rows = result["sweep"]
        batches = sorted({r["batch"] for r in rows})
        lines += ["", "Sweep (random-initialised G2GNets, G = 16, torch backend): speedup over the dense twin", "",
                  "| format | sparsity | " + " | ".join(f"batch {b}" for b in batches) + " |",
                  "|---|---|" + "---|" * len(batches)]
        for fmt in dict.fromkeys(r["format"] for r in rows):
            for sp in dict.fromkeys(r["sparsity"] for r in rows if r["format"] == fmt):
                cells = [next(f"{r['speedup']:.2f}x" for r in rows if r["format"] == fmt and r["sparsity"] == sp
                              and r["batch"] == b) for b in batches]
                lines.append(f"| {fmt} | {sp:.2%} | " + " | ".join(cells) + " |")
            lines.append(f"| {fmt} break-even | | " + " | ".join(break_even(rows, fmt, b) for b in batches) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    from g2gserve.plotting import plt, save_png

    panels = [k for k in ("runs", "sweep") if result.get(k)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], panels):
        if kind == "runs":
            for backend in dict.fromkeys(r["backend"] for r in result["runs"]):
                rs = [r for r in result["runs"] if r["backend"] == backend]
                xs = [r["batch"] for r in rs]
                line, = ax.plot(xs, [r["sparse"]["p50_ms"] for r in rs], "o-", label=f"{backend} sparse")
                ax.plot(xs, [r["dense"]["p50_ms"] for r in rs], "s--", color=line.get_color(), label=f"{backend} dense")
            ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="p50 latency (ms)",
                   title=f"latency, {result['device']}, {result['threads']} thread(s)")
        else:
            for fmt in dict.fromkeys(r["format"] for r in result["sweep"]):
                for n in sorted({r["batch"] for r in result["sweep"]}):
                    rs = sorted((r for r in result["sweep"] if r["format"] == fmt and r["batch"] == n),
                                key=lambda r: r["sparsity"])
                    ax.plot([100 * r["sparsity"] for r in rs], [r["speedup"] for r in rs],
                            "o-" if fmt == "block" else "x--", label=f"{fmt}, batch {n}")
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set(xlabel="sparsity (%)", ylabel="speedup over dense", title="sparsity sweep (break-even at 1)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="g2g-bench",
        description="Latency and memory of a sparse G2GNet against its dense twin (the same function with dense "
                    "weights), run interleaved in one process after a warm-up, pinned to --threads. Writes "
                    "OUT/bench.json, OUT/bench.md and OUT/bench.png.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", type=Path, nargs="?", help="export directory or model.pt (optional with --sweep)")
    p.add_argument("--batch-sizes", type=_csv(int), default=[1, 8, 64])
    p.add_argument("--backends", type=_csv(str), default=list(CPU_BACKENDS),
                   help="comma-separated: torch, onnxruntime, fused; reduced precision (compared among themselves): "
                        "fused-bf16 (AVX512-BF16 CPUs), fused-int8 (AVX512-VNNI; per-row input scales), "
                        "fused-int8-static (the export's calibrated scales), onnxruntime-int8 (quantize_dynamic), "
                        "onnxruntime-int8-static (quantize_static on the export's calibration images: --data-dir)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="where the model's data set is, for onnxruntime-int8-static's calibration (default: the "
                        "Debian Fashion-MNIST package where it applies)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: best sparse (torch block layer or Triton kernel) vs dense at each --dtypes, all in "
                        "CUDA graphs (g2gserve/bench/gpu.py); --sweep then adds random models of --sweep-hidden width")
    p.add_argument("--dtypes", type=_csv(str), default=["tf32", "bf16"], help="with --device cuda: precisions "
                   f"({', '.join(DTYPES)})")
    p.add_argument("--sweep-hidden", type=_csv(int), default=[4096, 8192],
                   help="with --device cuda --sweep: hidden widths (3 layers) of the random G2GNets")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (and pinned cores)")
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per backend and batch size (after warm-up); the backends take turns in chunks of "
                        f"~{CHUNK_SECONDS} s")
    p.add_argument("--sweep", action="store_true", help="also time random G2GNets at 50/75/87.5/93.75%% sparsity, "
                                                        "block and CSR, and report the break-even points")
    p.add_argument("--run-length", type=int, default=1, metavar="N",
                   help="calls of one model before switching to the other: 1 is strict A B A B (each call after "
                        "the other model evicted its weights from the caches); N > 1 times N warm calls per switch "
                        "(the first call after a switch is not counted), like a server that runs one model")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    p.add_argument("--no-peak", action="store_true",
                   help="skip the machine's measured limits: dense GEMMs (onnxruntime MatMul, n^3 for n = 512, 1024, "
                        "2048) for the peak G MAC/s, and reading the two models' weight bytes alone (strictly "
                        "alternated) for the batch-1 stream bound")
    p.add_argument("--profile", action="store_true",
                   help="also profile model.onnx and dense.onnx node by node with onnxruntime's profiler "
                        "(export directory only): where the time goes, per op type")
    p.add_argument("--out", type=Path, default=Path("bench"), help="output directory")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.model is None and not args.sweep:
        parser.error("give a MODEL (export directory or model.pt), or --sweep")
    unknown = [b for b in args.backends if b not in BACKENDS and b not in REDUCED]
    if unknown:
        parser.error(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join((*BACKENDS, *REDUCED))}")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda asked for but torch sees no CUDA device")
        if any(d not in DTYPES for d in args.dtypes) or not args.dtypes:
            parser.error(f"--dtypes: choose from {', '.join(DTYPES)}")
    if not args.batch_sizes or min(args.batch_sizes) < 1 or args.threads < 1 or args.run_length < 1:
        parser.error("batch sizes, --threads and --run-length must be positive")
    if args.model is not None and not args.model.exists():
        parser.error(f"{args.model}: no such export directory or checkpoint")
    if args.profile and (args.model is None or not args.model.is_dir()):
        parser.error("--profile needs an export directory (it profiles its model.onnx and dense.onnx)")
    cores = pin_threads(args.threads)
    result = {"command": "g2g-bench " + " ".join(argv), "machine": machine_info(), "device": args.device,
              "threads": args.threads, "run_length": args.run_length, "pinned_cores": cores,
              "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        if args.device == "cuda":
            from g2gserve.bench.gpu import gpu_bench
            result |= gpu_bench(args.model, args.batch_sizes, args.dtypes, args.seconds,
                                args.sweep_hidden if args.sweep else [])
        elif args.model is not None:
            result |= bench_model(args.model, args.backends, args.batch_sizes, args.device, args.threads,
                                  args.seconds, memory=not args.no_memory, run_length=args.run_length,
                                  data_dir=args.data_dir)
            if not args.no_memory and load_summary() is not None:  # make install-size's measurement, if any
                result["install_size"] = load_summary()
        if args.profile:
            shape = tuple(read_bundle(args.model).packed.input_shape)
            result["profile"] = [{"graph": g, **ort_node_profile(str(args.model / g), n, shape, args.threads)}
                                 for n in args.batch_sizes for g in ("model.onnx", "dense.onnx")]
        if args.model is not None and not args.no_peak and args.device == "cpu":
            result["peak"] = gemm_peak(args.threads)
            sizes = result.get("sizes", {})
            if "stored_weight_bytes" in sizes and args.threads == 1:  # the batch-1 bound: the weights' stream
                result["stream"] = stream_ceiling(sizes["stored_weight_bytes"], sizes["dense_weight_bytes"])
        if args.sweep and args.device == "cpu":
            result["sweep"] = sweep(args.batch_sizes, args.threads, args.seconds, args.device)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"g2g-bench: error: {e}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "bench.json", json.dumps(result, indent=1) + "\n")
    if args.device == "cuda":
        from g2gserve.bench.gpu import markdown as gpu_markdown
        table = gpu_markdown(result)
    else:
        table = markdown(result)
        plot(result, args.out / "bench.png")
    atomic_write_text(args.out / "bench.md", table)
    print()
    print(table)
    written = ["bench.json", "bench.md"] + (["bench.png"] if args.device == "cpu" else [])
    print("wrote " + ", ".join(str(args.out / f) for f in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
