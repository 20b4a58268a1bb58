"""The CUDA paths: skipped without a GPU, run on a GPU machine (see docs/benchmarks.md for where)."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from g2gserve.model.checkpoint import from_model, load_model, save_checkpoint
from g2gserve.export import export_checkpoint
from g2gserve.model.g2gnet import build_model
from g2gserve.data.preprocess import Preprocess
from g2gserve.runtime import load
from training.dst import PRUNE, REGROW, DSTConfig, MaskScheduler
from training.fit import main as fit_main

from conftest import TINY_FLAGS, tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@pytest.mark.parametrize("granularity,prune,regrow", list(itertools.product(("edge", "block"), PRUNE, REGROW)))
def test_dst_invariants_on_cuda(granularity, prune, regrow):
    torch.manual_seed(0)
    model = build_model(tiny_config(granularity=granularity)).to(CUDA)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    sched = MaskScheduler(model, opt, DSTConfig(prune=prune, regrow=regrow, interval=5, window=3), total_steps=40, seed=0)
    counts = [int(l.mask.sum()) for l in model.hidden]
    gen = torch.Generator(device=CUDA).manual_seed(0)
    for _ in range(40):
        x = torch.randn(16, 1, 28, 28, device=CUDA, generator=gen)
        y = torch.randint(0, 10, (16,), device=CUDA, generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        for k, layer in enumerate(model.hidden):
            assert layer.mask.device.type == "cuda"
            assert int(layer.mask.sum()) == counts[k]
            assert torch.count_nonzero(layer.weight[~layer.mask]) == 0
    assert sorted({r["step"] for r in sched.records}) == [5, 10, 15, 20, 25, 30] and sched.records[-1]["turnover"] > 0


def test_fit_resume_export_and_runtime_on_cuda(idx_dir, tmp_path):
    out = tmp_path / "run"
    args = ["--data-dir", str(idx_dir), "--out", str(out), "--device", "cuda", *TINY_FLAGS, "--lr", "3e-3"]
    assert fit_main([*args, "--epochs", "3", "--stop-after", "2"]) == 0
    assert fit_main([*args, "--epochs", "3", "--resume"]) == 0
    model, ckpt = load_model(out / "model.pt")  # saved from CUDA, loads on CPU
    assert len(ckpt.history) == 3 and ckpt.history[-1]["test_acc"] > 0.5
    export_checkpoint(out / "model.pt", tmp_path / "export", data_dir=idx_dir)
    x = torch.rand(7, 1, 28, 28)
    ref = model.eval()(x)
    for variant in ("sparse", "dense"):
        gpu = load(tmp_path / "export", backend="torch", device="cuda", variant=variant)
        assert (gpu.logits(x).cpu() - ref).abs().max() < 1e-4


def test_packed_runtime_matches_on_cuda(tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny_config(granularity="block")).eval()
    save_checkpoint(tmp_path / "m.pt", from_model(model, [str(i) for i in range(10)], Preprocess(1, 28, 28, (0.3,), (0.35,))))
    for batch in (1, 7, 64):
        x = torch.rand(batch, 1, 28, 28)
        for variant in ("sparse", "dense"):
            m = load(tmp_path / "m.pt", backend="torch", device="cuda", variant=variant)
            assert (m.logits(x).cpu() - model(x)).abs().max() < 1e-4
