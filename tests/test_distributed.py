"""torchrun with gloo on CPU trains exactly what one process trains with the same global batch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from g2gserve.model.checkpoint import load_model

from training.fit import main as fit_main

from conftest import TINY_FLAGS

# Hebbian prune and gradient regrow: both all-reduced scores are exercised; an update every 2 steps.
FLAGS = [*TINY_FLAGS, "--device", "cpu", "--threads", "1", "--epochs", "2", "--seed", "3", "--prune", "hebbian",
         "--regrow", "gradient", "--dst-interval", "2", "--dst-end", "1.0", "--dst-schedule", "constant",
         "--dst-fraction", "0.2"]
ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str]) -> str:
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def _torchrun(*args: str) -> str:
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 "-m", "training.fit", *args])


def test_two_ranks_match_one_process_and_resume(idx_dir, tmp_path):
    # 256 images, global batch 32: each rank trains on 16 per step; 4 DST updates per epoch on each of 2 layers.
    data = ["--data-dir", str(idx_dir)]
    assert fit_main([*data, *FLAGS, "--out", str(tmp_path / "one")]) == 0
    _torchrun(*data, *FLAGS, "--out", str(tmp_path / "two"), "--stop-after", "1")
    assert "resuming" in _torchrun(*data, "--out", str(tmp_path / "two"), "--resume", "--device", "cpu",
                                   "--no-progress")
    one, ckpt_one = load_model(tmp_path / "one" / "model.pt")
    two, ckpt_two = load_model(tmp_path / "two" / "model.pt")
    # Every update ran on both ranks (a rank whose mask differed would have stopped the run) and chose
    # the same edges as the single process.
    records = [json.loads(l) for l in (tmp_path / "two" / "dst.jsonl").read_text().splitlines()]
    assert len(records) == 8 * 2 and records == ckpt_one.meta["dst_records"]
    for a, b in zip(one.hidden, two.hidden):
        assert torch.equal(a.mask, b.mask)
        assert torch.count_nonzero(b.weight[~b.mask]) == 0
    for (name, a), b in zip(one.state_dict().items(), two.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    assert [h["world_size"] for h in ckpt_two.history] == [2, 2] and ckpt_two.meta["world_size"] == 2
    assert [h["epoch"] for h in ckpt_two.history] == [1, 2]
    assert abs(ckpt_two.history[-1]["test_acc"] - ckpt_one.history[-1]["test_acc"]) <= 1 / 64
