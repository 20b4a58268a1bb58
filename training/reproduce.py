"""Reproduce the paper's comparison on real data: one budget, every model, several seeds; and the regime study.

    python -m training.reproduce --datasets fashion-mnist,cifar10,cifar100 --cifar-dir data/cifar
    python -m training.reproduce --study regimes --datasets cifar10,cifar100 --cifar-dir data/cifar --device cuda --jobs 8

Each cell (config x dataset x seed) is a ``python -m training.fit`` run in its own process (``--jobs``
at a time) under ``--cells-dir``; a stopped reproduction continues where it left off (finished cells
are skipped, a half-trained cell resumes from its last epoch). Finished cells are summarised as small
JSON files in ``--results-dir`` (meant to be committed), from which ``docs/results.md`` and its plot are
rebuilt at any time (``--table-only``), marking cells still missing. The comparison table carries paired
statistics (per-seed differences) of G2G + Hebbian DST against dense. ``--study regimes`` varies one
setting at a time around the comparison's (``AXES``: epochs, augmentation, width, sparsity, groups, the
follow-up repository's DST setting) for dense, dense-params, ER and G2G + Hebbian DST (edge and block),
and writes ``docs/regimes.md`` with one plot per axis.

On one GPU, ``--device cuda --jobs N`` runs N cells at once, one thread each: the training loop keeps the
data on the GPU and synchronises once per epoch, so the processes mostly wait on the GPU, not on each
other. Without CUDA MPS (``nvidia-cuda-mps-control -d``) the GPU time-slices between the processes'
contexts instead of running their small kernels side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch

from tqdm import tqdm

from g2gserve.model.accounting import model_summary
from g2gserve.bench.measure import machine_info
from g2gserve.model.checkpoint import CheckpointError, load_model
from g2gserve.data.datasets import DATASETS
from g2gserve.fileio import atomic_write_text

from .stats import paired

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


# G2G + Hebbian DST, compared with dense per seed (paired statistics in the table).
HEBBIAN = ("g2g-mixer-hebbian", "g2g-block-hebbian")
# The regime study: each axis varies one setting around the comparison's; these models at every point.
STUDY_CONFIGS = ("dense", "dense-params", "er", *HEBBIAN)
FOLLOW_UP_DST = {"dst-fraction": "0.1", "dst-interval": "1000", "dst-schedule": "constant", "dst-end": "1.0"}


def _groups_for(sparsity: float) -> int:
    """The comparison's G = 8, doubled until the sparsity is possible (intra-group density is 1/G)."""
    g = 8
    while 1.0 - 1.0 / g < sparsity - 1e-9:
        g *= 2
    return g


# axis -> (title, values, value -> extra fit flags); {} is the comparison's own setting (trained once).
AXES = {
    "epochs": ("training epochs", ["20", "100"], lambda v: {"epochs": v}),
    "augment": ("crop + flip augmentation", ["on", "off"], lambda v: {} if v == "on" else {"no-augment": ""}),
    "width": ("hidden width (3 layers)", ["1024", "2048", "4096"],
              lambda v: {} if v == "1024" else {"hidden": ",".join([v] * 3)}),
    "sparsity": ("sparsity (G doubled where 1/G exceeds the density)", ["0.5", "0.75", "0.875", "0.9375"],
                 lambda v: {} if v == "0.75" else {"sparsity": v} | (
                     {"groups": str(_groups_for(float(v)))} if _groups_for(float(v)) != 8 else {})),
    "groups": ("groups G", ["4", "8", "16"], lambda v: {} if v == "8" else {"groups": v}),
    "dst": ("DST setting: cosine-decayed 30% every 200 steps vs the follow-up repository's constant 10% every "
            "1000 steps (static: no DST, the masks as initialised; fade: cosine with pruned weights fading out over "
            "150 steps, --dst-fade; keep-groups: cosine moving only connections across groups, --dst-keep-groups; "
            "values to ask for with --axis-values)",
            ["cosine", "follow-up"],
            lambda v: {"follow-up": FOLLOW_UP_DST, "static": {"dst": "none"}, "fade": {"dst-fade": "150"},
                       "keep-groups": {"dst-keep-groups": ""}}.get(v, {})),
}
# Flags that change what a model computes (the others are ignored, so equal cells are trained once).
RELEVANT = {"dense": {"epochs", "augment", "no-augment", "hidden"},
            "er": {"epochs", "augment", "no-augment", "hidden", "sparsity"}}
RELEVANT["dense-params"] = RELEVANT["er"] | {"groups"}


@dataclass(frozen=True)
class Cell:
    config: str
    dataset: str
    seed: int
    point: tuple[tuple[str, str], ...] = ()  # extra fit flags (name without --, value) of a study point

    @property
    def key(self) -> str:
        tag = "".join(f"__{k}{'=' + v if v else ''}" for k, v in self.point)
        return f"{self.dataset}__{self.config}{tag}__seed{self.seed}"

    def config_flags(self) -> list[str]:
        return next(f for name, _, f in CONFIGS if name == self.config)

    def point_flags(self) -> list[str]:
        return [a for k, v in self.point for a in ((f"--{k}", v) if v else (f"--{k}",))]


def study_point(config: str, flags: dict[str, str], block_cap: int = 64, encoder: int = 512) -> tuple[tuple[str, str], ...]:
    """The flags of one study point that matter to ``config``, with a block size that fits its groups (dense-params
    too: its width is matched to the default, block-granular G2GNet of those groups)."""
    keep = {k: v for k, v in flags.items() if config not in RELEVANT or k in RELEVANT[config]}
    if config in ("g2g-block-hebbian", "dense-params") and ("groups" in keep or "hidden" in keep):
        groups = int(keep.get("groups", 8))
        sizes = [encoder // groups] + [int(w) // groups for w in keep.get("hidden", "1024").split(",")]
        block = block_cap
        while any(s % block for s in sizes):
            block //= 2
        if config != "dense-params" or block != block_cap:  # dense-params only needs it where the default fails
            keep["block-size"] = str(block)
    return tuple(sorted(keep.items()))


def fit_command(cell: Cell, args: argparse.Namespace, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "training.fit", "--dataset", cell.dataset, "--epochs", str(args.epochs),
           "--seed", str(cell.seed), "--out", str(out), "--threads", str(args.threads), "--device", args.device,
           "--no-progress", *cell.config_flags(), *args.fit_args.split(), *cell.point_flags()]
    data_dir = args.fmnist_dir if cell.dataset == "fashion-mnist" else args.cifar_dir
    return cmd + (["--data-dir", str(data_dir)] if data_dir else [])


# Flags that say where and how fast a cell ran, not what it trained.
_PLACE_FLAGS = {"--out", "--threads", "--device", "--data-dir"}


def training_flags(command: str | list[str]) -> list[str]:
    """A training.fit command's flags less those of ``_PLACE_FLAGS`` (with their values)."""
    words = command.split() if isinstance(command, str) else list(command)
    words = words[words.index("training.fit") + 1:]
    return [w for i, w in enumerate(words) if w not in _PLACE_FLAGS and (i == 0 or words[i - 1] not in _PLACE_FLAGS)]


def comparison_results(cells: list[Cell], args: argparse.Namespace, comparison_dir: Path) -> dict[str, dict]:
    """The regime study's cells at the comparison's own setting that the comparison already trained with the
    same training flags (its saved command is checked), so they are not trained twice."""
    saved = load_results(comparison_dir) if comparison_dir.is_dir() else {}
    return {c.key: saved[c.key] for c in cells
            if not c.point and c.key in saved
            and training_flags(saved[c.key]["command"]) == training_flags(fit_command(c, args, Path(".")))}


def run_cell(cell: Cell, args: argparse.Namespace) -> dict:
    out = args.cells_dir / cell.key.replace("__", "/")
    cmd = fit_command(cell, args, out)
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
        "point": dict(cell.point), "device": _device_name(args.device),
        "command": " ".join(["python", "-m", "training.fit", *cmd[3:]]),
    }
    atomic_write_text(args.results_dir / f"{cell.key}.json", json.dumps(result, indent=1) + "\n")
    return result


def _device_name(device: str) -> str:
    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{machine_info()['cpu']} (CPU)"


def load_results(results_dir: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))}


def build_table(cells: list[Cell], results: dict[str, dict], args: argparse.Namespace) -> str:
    lines = [
        "# Results: G2GNet vs baselines on real data",
        "",
        "Produced by `python -m training.reproduce " + shlex.join(args.argv) + "` "
        f"(each cell: `python -m training.fit` with the flags below, {args.epochs} epochs, Adam 1e-3, cosine, batch 256).",
        f"Machine: {machine_info()['cpu']} ({os.cpu_count()} cores), torch {machine_info()['torch']}, "
        f"{args.jobs} cell(s) in parallel with {args.threads} thread(s) each; table written {time.strftime('%Y-%m-%d %H:%M')}. "
        f"Cells trained on: {_devices(results)}.",
        f"Wall time of the finished cells' training, summed: {sum(r['train_time_s'] for r in results.values()) / 3600:.1f} h "
        "(cells share the machine, so single times are not comparable).",
        "Accuracy is the test accuracy after the last epoch, mean ± std over the seeds that finished; "
        "Δ is the difference to the dense network of the same widths in percentage points.",
        "This is one setting; the regime study (`--study regimes`: 100 epochs, no augmentation, other widths, "
        "sparsities, G and DST settings, with a plot per axis and a computed conclusion) is in "
        "[regimes.md](regimes.md), and what it shows in "
        "[training.md](training.md#the-comparison-on-three-seeds-and-the-regime-study).",
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
        lines += ["", *_paired_lines(cells, results, dataset), ""]
    missing = [c.key for c in cells if c.key not in results]
    if missing:
        lines += [f"**Missing cells ({len(missing)}):** " + ", ".join(missing), ""]
    lines += ["## Flags per model", "",
              "Every cell runs `python -m training.fit --dataset D --epochs E --seed S --threads T` (plus `--data-dir` "
              "for CIFAR) with:", ""] + [f"- {desc}: `{' '.join(f)}`" for _, desc, f in CONFIGS] + [""]
    return "\n".join(lines)


def _devices(results: dict[str, dict]) -> str:
    """Where the finished cells ran, with how many each (results written before devices were recorded ran on the
    CPU); each cell's JSON holds its own device and command."""
    counts = Counter(r.get("device", "CPU (not recorded)") for r in results.values())
    return (", ".join(f"{name} ({n})" for name, n in sorted(counts.items()))
            + " (each cell's device and command are in its JSON)") if counts else "none yet"


def _accs(cells: list[Cell], results: dict[str, dict], dataset: str, config: str,
          point: tuple = ()) -> dict[int, float]:
    """{seed: test accuracy in %} of one model at one point."""
    return {c.seed: 100 * results[c.key]["test_acc"] for c in cells
            if c.dataset == dataset and c.config == config and c.point == point and c.key in results}


# Paired comparisons in the table: G2G + Hebbian DST against each baseline, and the block form against the edge form.
PAIRS = [(h, base) for h in HEBBIAN for base in ("dense", "dense-params", "er")] + [HEBBIAN[::-1]]


def _paired_lines(cells: list[Cell], results: dict[str, dict], dataset: str) -> list[str]:
    """``PAIRS``, paired by seed: mean ± std of the differences, 95% CI, paired t-test."""
    lines = []
    for name, base in PAIRS:
        stats = paired(_accs(cells, results, dataset, name), _accs(cells, results, dataset, base))
        if stats is not None:
            desc, base_desc = (next(d for n, d, _ in CONFIGS if n == c) for c in (name, base))
            lines.append(f"- {desc} − {base_desc if base in HEBBIAN else base}: {stats.describe()}")
    return (["Paired by seed (a seed gives every model the same data order and augmentation), in percentage points:",
             "", *lines] if lines else [])


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


# ---------------------------------------------------------------- the regime study
def regime_points(axes: list[str], values: dict[str, list[str]], epochs: int) -> dict[str, dict[str, dict[str, str]]]:
    """{axis: {value: extra fit flags}}; a flag equal to the run's own setting is dropped (same cell)."""
    points = {}
    for axis in axes:
        _, default_values, make = AXES[axis]
        points[axis] = {v: {k: x for k, x in make(v).items() if not (k == "epochs" and x == str(epochs))}
                        for v in values.get(axis, default_values)}
    return points


def regime_cells(points: dict, datasets: list[str], seeds: dict[str, int], configs=STUDY_CONFIGS) -> list[Cell]:
    """Every (model, data set, seed, point) of the study, each distinct training run once, seed-major."""
    cells = [Cell(config, d, s, study_point(config, flags))
             for s in range(max(seeds.get(d, 1) for d in datasets)) for d in datasets if s < seeds.get(d, 1)
             for by_value in points.values() for flags in by_value.values() for config in configs]
    return list(dict.fromkeys(cells))


def _cell_text(accs: dict[int, float]) -> str:
    if not accs:
        return "*missing*"
    vals = list(accs.values())
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f} ({len(vals)})" if len(vals) > 1 \
        else f"{vals[0]:.2f} (1)"


def _verdict(stats) -> str | None:
    """Which side a paired 95% CI puts a difference on, or None without one."""
    if stats is None or stats.ci95 is None:
        return None
    lo, hi = stats.ci95
    return "ahead" if lo > 0 else "behind" if hi < 0 else "within noise"


def build_regime_table(cells: list[Cell], results: dict[str, dict], points: dict, datasets: list[str],
                       configs: list[str], args: argparse.Namespace, plots_dir: Path) -> str:
    lines = [
        "# Regime study: where (if anywhere) G2G beats dense", "",
        "Produced by `python -m training.reproduce " + shlex.join(args.argv) + "`. Each axis changes one setting "
        f"of the comparison in [results.md](results.md) ({args.epochs} epoch(s), crop + flip on CIFAR, hidden 3 × 1024, "
        "75% sparsity, G = 8, cosine-decayed Hebbian DST" + (f"; here every cell also gets `{args.fit_args}`"
                                                            if args.fit_args else "")
        + ") and keeps the rest; cells: accuracy mean ± std (seeds). "
        "Δ rows: G2G + Hebbian DST minus dense of the same widths, paired by seed, with its 95% confidence interval.",
        f"Machine: {machine_info()['cpu']} ({os.cpu_count()} cores), torch {machine_info()['torch']}; cells trained on: "
        f"{_devices(results)}; {sum(c.key in results for c in cells)}/{len(cells)} cells finished; "
        f"table written {time.strftime('%Y-%m-%d %H:%M')}.", "",
    ]
    verdicts: dict[str, list[str]] = {"ahead": [], "behind": [], "within noise": []}
    block_cost = []
    for axis, by_value in points.items():
        title = AXES[axis][0]
        lines += [f"## {title}", "", f"![{axis}]({plots_dir.name}/{axis}.png)", ""]
        for dataset in datasets:
            lines += [f"### {dataset}", "", "| model | " + " | ".join(by_value) + " |", "|---|" + "---|" * len(by_value)]
            for config in configs:
                desc = next(d for n, d, _ in CONFIGS if n == config)
                row = [_cell_text(_accs(cells, results, dataset, config, study_point(config, f))) for f in by_value.values()]
                lines.append(f"| {desc} | " + " | ".join(row) + " |")
            for config in (c for c in HEBBIAN if c in configs and "dense" in configs):
                row = []
                for value, f in by_value.items():
                    stats = paired(_accs(cells, results, dataset, config, study_point(config, f)),
                                   _accs(cells, results, dataset, "dense", study_point("dense", f)))
                    row.append("" if stats is None else stats.describe())
                    verdict = _verdict(stats)
                    if verdict and config == "g2g-mixer-hebbian":
                        verdicts[verdict].append(f"{dataset} {axis}={value} ({stats.mean:+.2f})")
                lines.append(f"| Δ {config} − dense | " + " | ".join(row) + " |")
            for value, f in by_value.items():
                stats = paired(_accs(cells, results, dataset, "g2g-block-hebbian", study_point("g2g-block-hebbian", f)),
                               _accs(cells, results, dataset, "g2g-mixer-hebbian", study_point("g2g-mixer-hebbian", f)))
                if stats is not None:
                    block_cost.append(f"{dataset} {axis}={value}: {stats.describe()}")
            lines.append("")
    unique = {k: list(dict.fromkeys(v)) for k, v in verdicts.items()}
    lines += ["## Conclusion (computed from the cells above)", "",
              "G2G mixer + Hebbian DST (edge masks, the paper's form) against dense of the same widths, where the "
              "paired 95% CI excludes zero (points with fewer than 2 paired seeds have no verdict):", "",
              f"- G2G ahead: {', '.join(unique['ahead']) or 'nowhere'}",
              f"- dense ahead: {', '.join(unique['behind']) or 'nowhere'}",
              f"- within noise: {', '.join(unique['within noise']) or 'nowhere'}", "",
              "Block granularity (64 × 64 tiles, what the fast runtime serves) minus edge granularity, both with "
              "Hebbian DST, paired by seed:", "",
              *(f"- {b}" for b in dict.fromkeys(block_cost) or ["no paired cells yet"]), ""]
    missing = [c.key for c in cells if c.key not in results]
    if missing:
        lines += [f"**Missing cells ({len(missing)}).**", ""]
    return "\n".join(lines)


def plot_regimes(cells: list[Cell], results: dict[str, dict], points: dict, datasets: list[str], configs: list[str],
                 out_dir: Path) -> None:
    """One PNG per axis: accuracy (mean ± std over seeds) against the axis value, one panel per data set."""
    from g2gserve.plotting import plt, save_png

    out_dir.mkdir(parents=True, exist_ok=True)
    for axis, by_value in points.items():
        fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4), squeeze=False)
        for ax, dataset in zip(axes[0], datasets):
            for config in configs:
                xs, means, stds = [], [], []
                for i, f in enumerate(by_value.values()):
                    accs = list(_accs(cells, results, dataset, config, study_point(config, f)).values())
                    if accs:
                        xs.append(i)
                        means.append(statistics.mean(accs))
                        stds.append(statistics.stdev(accs) if len(accs) > 1 else 0.0)
                if xs:
                    ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=config,
                                linestyle="--" if config.startswith(("dense", "er")) else "-")
            ax.set_xticks(range(len(by_value)), list(by_value))
            ax.set(title=dataset, xlabel=axis, ylabel="test accuracy (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(AXES[axis][0], fontsize=9)
        fig.tight_layout()
        save_png(fig, out_dir / f"{axis}.png", dpi=90)


def _train_cells(todo: list[Cell], args: argparse.Namespace, write_table) -> None:
    """Train the missing cells, ``--jobs`` at a time, rewriting the table as each finishes."""
    print(f"training {len(todo)} cell(s) with {args.jobs} job(s) on device {args.device}")
    failures, epochs, start = [], 0, time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool, tqdm(total=len(todo), unit="cell") as bar:
        futures = {pool.submit(run_cell, c, args): c for c in todo}
        for f in as_completed(futures):
            try:
                r = f.result()
                epochs += r["epochs"]
                bar.write(f"{futures[f].key}: {100 * r['test_acc']:.2f}%")
            except (RuntimeError, CheckpointError) as e:
                failures.append(str(e))
                bar.write(f"FAILED {e}")
            bar.update()
            write_table()
    wall = time.perf_counter() - start
    print(f"{len(todo) - len(failures)} cell(s), {epochs} epochs in {wall:.0f} s: "
          f"{epochs / wall:.2f} epochs/s in total with {args.jobs} job(s)")
    if failures:
        print("\n".join(failures), file=sys.stderr)


def _seeds(text: str, datasets: list[str]) -> dict[str, int]:
    if "=" not in text:
        return {d: int(text) for d in datasets}
    return {k: int(v) for k, v in (kv.split("=") for kv in text.split(","))}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m training.reproduce", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--study", choices=("comparison", "regimes"), default="comparison",
                   help="comparison: every model at the paper's setting; regimes: one setting varied at a time")
    p.add_argument("--datasets", default=None, help="default: fashion-mnist,cifar10,cifar100 (regimes: cifar10,cifar100)")
    p.add_argument("--seeds", default="3", help="seeds per data set: N, or DATASET=N,...")
    p.add_argument("--configs", default=None,
                   help=f"subset of configs; default: all (regimes: {','.join(STUDY_CONFIGS)})")
    p.add_argument("--axes", default=",".join(AXES), help="subset of the regime study's axes")
    p.add_argument("--axis-values", default="", metavar="AXIS=V1,V2;...",
                   help="other values for regime axes (e.g. for a smoke test): width=64,128;epochs=1,2")
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
    p.add_argument("--results-dir", type=Path, default=None,
                   help="small per-cell result JSON (default docs/results/cells, regimes: docs/results/regimes)")
    p.add_argument("--out", type=Path, default=None, help="default docs/results.md (regimes: docs/regimes.md)")
    p.add_argument("--table-only", action="store_true", help="rebuild the table and plot from saved cells, train nothing")
    p.add_argument("--comparison-dir", type=Path, default=Path("docs/results/cells"),
                   help="regimes: where the comparison's cells are; those at the comparison's own setting, trained "
                        "with the same flags, count for the study's unvaried point")
    args = p.parse_args(argv)
    args.argv = [a for a in argv if a != "--table-only"]
    regimes = args.study == "regimes"
    datasets = (args.datasets or ("cifar10,cifar100" if regimes else "fashion-mnist,cifar10,cifar100")).split(",")
    args.results_dir = args.results_dir or Path("docs/results/regimes" if regimes else "docs/results/cells")
    args.out = args.out or Path("docs/regimes.md" if regimes else "docs/results.md")
    configs = args.configs.split(",") if args.configs else list(STUDY_CONFIGS if regimes else (n for n, _, _ in CONFIGS))
    axes = args.axes.split(",")
    unknown = ([d for d in datasets if d not in DATASETS] + [c for c in configs if c not in {n for n, _, _ in CONFIGS}]
               + [a for a in axes if a not in AXES])
    try:
        values = {k: v.split(",") for k, v in (kv.split("=") for kv in args.axis_values.split(";") if kv)}
        seeds = _seeds(args.seeds, datasets)
    except ValueError:
        p.error("--seeds is N or DATASET=N,...; --axis-values is AXIS=V1,V2;...")
    unknown += [a for a in values if a not in AXES]
    if unknown:
        p.error(f"unknown dataset/config/axis: {', '.join(unknown)}")
    if regimes:
        points = regime_points(axes, values, args.epochs)
        cells = regime_cells(points, datasets, seeds, configs)
        plots_dir = args.out.with_suffix("")

        def results_of() -> dict[str, dict]:
            return comparison_results(cells, args, args.comparison_dir) | load_results(args.results_dir)

        def write_table() -> None:
            atomic_write_text(args.out, build_regime_table(cells, results_of(), points, datasets, configs, args,
                                                           plots_dir))
    else:
        # Seed-major order: a partial run has every config on every data set once before it has any twice.
        cells = [Cell(c, d, s) for s in range(max(seeds.get(d, 1) for d in datasets)) for d in datasets
                 for c in configs if s < seeds.get(d, 1)]

        def results_of() -> dict[str, dict]:
            return load_results(args.results_dir)

        def write_table() -> None:
            atomic_write_text(args.out, build_table(cells, results_of(), args))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    todo = [c for c in cells if c.key not in results_of()]
    print(f"{len(cells) - len(todo)} of {len(cells)} cells done")
    if not args.table_only and todo:
        _train_cells(todo, args, write_table)
    write_table()
    results = results_of()
    if regimes:
        plot_regimes(cells, results, points, datasets, configs, plots_dir)
        pictures = f"{plots_dir}/*.png"
    else:
        plot(cells, results, args.out.with_suffix(".png"))
        pictures = str(args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {pictures} ({sum(c.key in results for c in cells)}/{len(cells)} cells)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
