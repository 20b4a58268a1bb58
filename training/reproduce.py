"""Reproduce the paper's comparison on real data: one budget, every model, several seeds.

    python -m training.reproduce --datasets fashion-mnist,cifar10,cifar100 --cifar-dir data/cifar

Each cell (config x dataset x seed) is a ``python -m training.fit`` run in its own process (``--jobs``
at a time) under ``--cells-dir``; a stopped reproduction continues where it left off (finished cells
are skipped, a half-trained cell resumes from its last epoch). Finished cells are summarised as small
JSON files in ``--results-dir`` (meant to be committed), from which ``docs/results.md`` and its plot are
rebuilt at any time (``--table-only``), marking cells still missing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from g2gserve.model.accounting import model_summary
from g2gserve.bench.measure import machine_info
from g2gserve.model.checkpoint import CheckpointError, load_model
from g2gserve.data.datasets import DATASETS
from g2gserve.fileio import atomic_write_text

# (name, description, fit flags). The order is the order of the table.
CONFIGS = [
    ("dense", "dense, same widths", ["--model", "dense"]),
    ("dense-params", "dense, width matched to g2g's active parameters", ["--model", "dense-params"]),
    ("er", "Erdős–Rényi, same density, static", ["--model", "er", "--granularity", "edge", "--dst", "none"]),
    ("g2g-index", "G2G index grouping, static",
     ["--model", "g2g", "--grouping", "index", "--granularity", "edge", "--dst", "none"]),
    ("g2g-mixer", "G2G mixer grouping, static",
     ["--model", "g2g", "--grouping", "mixer", "--granularity", "edge", "--dst", "none"]),
    ("g2g-mixer-set", "G2G mixer + DST (magnitude prune, random regrow)",
     ["--model", "g2g", "--grouping", "mixer", "--granularity", "edge", "--dst", "set"]),
    ("g2g-mixer-hebbian", "G2G mixer + DST Hebbian",
     ["--model", "g2g", "--grouping", "mixer", "--granularity", "edge", "--dst", "hebbian"]),
    ("g2g-block-hebbian", "G2G mixer, block 64x64 tiles + DST Hebbian",
     ["--model", "g2g", "--grouping", "mixer", "--granularity", "block", "--block-size", "64", "--dst", "hebbian"]),
]


@dataclass(frozen=True)
class Cell:
    config: str
    dataset: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.dataset}__{self.config}__seed{self.seed}"


def _flags(config: str) -> list[str]:
    return next(f for name, _, f in CONFIGS if name == config)


def run_cell(cell: Cell, args: argparse.Namespace) -> dict:
    out = args.cells_dir / cell.dataset / cell.config / f"seed{cell.seed}"
    cmd = [sys.executable, "-m", "training.fit", "--dataset", cell.dataset, "--epochs", str(args.epochs),
           "--seed", str(cell.seed), "--out", str(out), "--threads", str(args.threads), "--device", args.device,
           "--no-progress", *_flags(cell.config), *args.fit_args.split()]
    data_dir = args.fmnist_dir if cell.dataset == "fashion-mnist" else args.cifar_dir
    if data_dir:
        cmd += ["--data-dir", str(data_dir)]
    if (out / "state.pt").exists():
        cmd += ["--resume"]
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(out / "fit.log", "a") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{cell.key}: training.fit exited {proc.returncode}; see {out / 'fit.log'}")
    model, ckpt = load_model(out / "model.pt")
    s = model_summary(model)
    result = {
        "config": cell.config, "dataset": cell.dataset, "seed": cell.seed, "epochs": len(ckpt.history),
        "test_acc": ckpt.history[-1]["test_acc"], "params": s["params"], "active_params": s["active_params"],
        "density": sum(l["macs_sparse"] for l in s["layers"][1:-1]) / sum(l["macs_dense"] for l in s["layers"][1:-1]),
        "macs_sparse": s["macs_sparse"], "macs_dense": s["macs_dense"],
        "train_time_s": sum(h["train_time_s"] for h in ckpt.history), "wall_s_this_run": time.time() - start,
        "command": " ".join(["python", "-m", "training.fit", *cmd[3:]]),
    }
    atomic_write_text(args.results_dir / f"{cell.key}.json", json.dumps(result, indent=1) + "\n")
    return result


def load_results(results_dir: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))}


def build_table(cells: list[Cell], results: dict[str, dict], args: argparse.Namespace) -> str:
    lines = [
        "# Results: G2GNet vs baselines on real data",
        "",
        "Produced by `python -m training.reproduce " + " ".join(args.argv) + "` "
        f"(each cell: `python -m training.fit` with the flags below, {args.epochs} epochs, Adam 1e-3, cosine, batch 256).",
        f"Machine: {machine_info()['cpu']} ({os.cpu_count()} cores, CPU only), torch {machine_info()['torch']}, "
        f"{args.jobs} cell(s) in parallel with {args.threads} thread(s) each; table written {time.strftime('%Y-%m-%d %H:%M')}.",
        f"Wall time of the finished cells' training, summed: {sum(r['train_time_s'] for r in results.values()) / 3600:.1f} h "
        "(cells share the machine, so single times are not comparable).",
        "Accuracy is the test accuracy after the last epoch, mean ± std over the seeds that finished; "
        "Δ is the difference to the dense network of the same widths in percentage points.",
        "",
    ]
    for dataset in dict.fromkeys(c.dataset for c in cells):
        lines += [f"## {dataset}", "",
                  "| model | test accuracy (%) | Δ vs dense | seeds | active params | density | MACs/image |",
                  "|---|---|---|---|---|---|---|"]
        dense_accs = [100 * results[c.key]["test_acc"] for c in cells
                      if c.dataset == dataset and c.config == "dense" and c.key in results]
        for name, desc, _ in CONFIGS:
            mine = [c for c in cells if c.dataset == dataset and c.config == name]
            if not mine:
                continue
            done = [results[c.key] for c in mine if c.key in results]
            if not done:
                lines.append(f"| {desc} | *missing* | | 0/{len(mine)} | | | |")
                continue
            accs = [100 * r["test_acc"] for r in done]
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            r0 = done[0]
            delta = f"{statistics.mean(accs) - statistics.mean(dense_accs):+.2f}" if dense_accs else ""
            acc = f"{statistics.mean(accs):.2f} ± {std:.2f}" if len(accs) > 1 else f"{accs[0]:.2f}"
            lines.append(f"| {desc} | {acc} | {delta} | {len(done)}/{len(mine)} | "
                         f"{r0['active_params']:,} | {r0['density']:.3f} | {r0['macs_sparse']:,} |")
        lines.append("")
    missing = [c.key for c in cells if c.key not in results]
    if missing:
        lines += [f"**Missing cells ({len(missing)}):** " + ", ".join(missing), ""]
    lines += ["## Flags per model", "",
              "Every cell runs `python -m training.fit --dataset D --epochs E --seed S --threads T` (plus `--data-dir` "
              "for CIFAR) with:", ""] + [f"- {desc}: `{' '.join(f)}`" for _, desc, f in CONFIGS] + [""]
    return "\n".join(lines)


def plot(cells: list[Cell], results: dict[str, dict], path: Path) -> None:
    from g2gserve.plotting import plt, save_png

    datasets = list(dict.fromkeys(c.dataset for c in cells))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4.5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        names, means, stds = [], [], []
        for name, _, _ in CONFIGS:
            accs = [100 * results[c.key]["test_acc"] for c in cells
                    if c.dataset == dataset and c.config == name and c.key in results]
            if accs:
                names.append(name)
                means.append(statistics.mean(accs))
                stds.append(statistics.stdev(accs) if len(accs) > 1 else 0.0)
        if not means:
            ax.text(0.5, 0.5, "no finished cells yet", ha="center", va="center", transform=ax.transAxes)
            ax.set(xticks=[], yticks=[])
        bars = ax.barh(names, means, xerr=stds, color=["#999" if n.startswith(("dense", "er")) else "#2a7" for n in names])
        ax.bar_label(bars, fmt="%.2f", padding=3, fontsize=8)
        if means:
            ax.set_xlim(min(means) - 3, max(means) + 1.5)
        ax.invert_yaxis()
        ax.set(title=dataset, xlabel="test accuracy (%)")
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    save_png(fig, path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m training.reproduce", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--datasets", default="fashion-mnist,cifar10,cifar100")
    p.add_argument("--seeds", default="fashion-mnist=3,cifar10=1,cifar100=1",
                   help="seeds per dataset, DATASET=N,...")
    p.add_argument("--configs", default=",".join(n for n, _, _ in CONFIGS), help="subset of configs to run")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--jobs", type=int, default=1, help="cells trained in parallel processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads per cell")
    p.add_argument("--device", default="auto")
    p.add_argument("--cifar-dir", type=Path, default=None,
                   help="directory holding cifar10/ and cifar100/ train.npz+test.npz (../shared/data/cifar.py unpack DIR)")
    p.add_argument("--fmnist-dir", type=Path, default=None,
                   help="Fashion-MNIST idx directory (default: the Debian package, else torchvision's download)")
    p.add_argument("--fit-args", default="", help="extra flags for every training.fit run (e.g. a smaller --hidden)")
    p.add_argument("--cells-dir", type=Path, default=Path("runs/reproduce"), help="where cells train (large files)")
    p.add_argument("--results-dir", type=Path, default=Path("docs/results/cells"), help="small per-cell result JSON")
    p.add_argument("--out", type=Path, default=Path("docs/results.md"))
    p.add_argument("--table-only", action="store_true", help="rebuild the table and plot from saved cells, train nothing")
    args = p.parse_args(argv)
    args.argv = [a for a in argv if a != "--table-only"]
    datasets = args.datasets.split(",")
    unknown = [d for d in datasets if d not in DATASETS] + [c for c in args.configs.split(",") if c not in {n for n, _, _ in CONFIGS}]
    if unknown:
        p.error(f"unknown dataset/config: {', '.join(unknown)}")
    seeds = {k: int(v) for k, v in (kv.split("=") for kv in args.seeds.split(","))}
    # Seed-major order: a partial run has every config on every data set once before it has any twice.
    cells = [Cell(c, d, s) for s in range(max(seeds.get(d, 1) for d in datasets)) for d in datasets
             for c in args.configs.split(",") if s < seeds.get(d, 1)]
    args.results_dir.mkdir(parents=True, exist_ok=True)
    todo = [c for c in cells if c.key not in load_results(args.results_dir)]
    if not args.table_only and todo:
        print(f"{len(cells) - len(todo)} of {len(cells)} cells done; training {len(todo)} with {args.jobs} job(s)")
        failures = []
        with ThreadPoolExecutor(args.jobs) as pool, tqdm(total=len(todo), unit="cell") as bar:
            futures = {pool.submit(run_cell, c, args): c for c in todo}
            for f in as_completed(futures):
                try:
                    r = f.result()
                    bar.write(f"{futures[f].key}: {100 * r['test_acc']:.2f}%")
                except (RuntimeError, CheckpointError) as e:
                    failures.append(str(e))
                    bar.write(f"FAILED {e}")
                bar.update()
                results = load_results(args.results_dir)
                atomic_write_text(args.out, build_table(cells, results, args))
        if failures:
            print("\n".join(failures), file=sys.stderr)
    results = load_results(args.results_dir)
    atomic_write_text(args.out, build_table(cells, results, args))
    plot(cells, results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} ({sum(c.key in results for c in cells)}/{len(cells)} cells)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
