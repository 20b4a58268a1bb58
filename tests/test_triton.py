"""The fused block-sparse Triton kernel and the triton backend against PyTorch; the precision gate.

Without a GPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set here before the kernel module is
imported, on small shapes); on a GPU machine the same tests run the compiled kernel on CUDA.
"""
import json
import os

import numpy as np
import pytest
import torch

from g2gserve.data.preprocess import Preprocess
from g2gserve.bundle import read_bundle
from g2gserve.export import export_checkpoint
from g2gserve.formats import densify, pack_model
from g2gserve.model.checkpoint import from_model, save_checkpoint
from g2gserve.model.g2gnet import build_model
from g2gserve.runtime import load
from g2gserve.runtime.precision import MIN_TOP1_AGREEMENT, agreement, main as precision_main, precision_gate

from conftest import tiny_config

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernel's definition
triton = pytest.importorskip("triton", reason="Triton is not installed (it ships with torch on Linux)")
from g2gserve.runtime import triton_kernel  # noqa: E402
from g2gserve.runtime.triton_backend import TritonModule  # noqa: E402
from g2gserve.runtime.triton_kernel import block_sparse_linear  # noqa: E402

if not CUDA and not triton_kernel.INTERPRETED:
    pytest.skip("no GPU, and the kernel module was imported before TRITON_INTERPRET=1 was set",
                allow_module_level=True)
DEVICE = torch.device("cuda" if CUDA else "cpu")
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}  # relative to the output's scale


def _layer(n_out: int, n_in: int, k: int, b: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randn(n_out, k * b, b, generator=gen) / (k * b) ** 0.5
    idx = torch.stack([torch.randperm(n_in, generator=gen)[:k] for _ in range(n_out)]).to(torch.int32)
    idx[0, -1] = idx[0, 0]  # a padded row repeats a tile (its block is then zero in a real export)
    blocks[0, (k - 1) * b:] = 0
    return blocks, idx, torch.randn(n_out * b, generator=gen)


def _reference(x, blocks, idx, bias, relu):
    """The layer as one dense fp32 matmul."""
    n_out, kb, b = blocks.shape
    w = torch.zeros(x.shape[1], n_out * b)
    for o in range(n_out):
        for k, src in enumerate(idx[o].tolist()):
            w[src * b:(src + 1) * b, o * b:(o + 1) * b] += blocks[o, k * b:(k + 1) * b]
    y = x @ w + bias
    return torch.relu(y) if relu else y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("b,n_out,n_in,k", [(16, 4, 6, 3), (32, 3, 4, 1), (16, 2, 2, 2)])
@pytest.mark.parametrize("batch", [1, 5, 17, 130])
def test_kernel_matches_dense_matmul(dtype, b, n_out, n_in, k, batch):
    blocks, idx, bias = _layer(n_out, n_in, k, b)
    x = torch.randn(batch, n_in * b)
    # the reference sees the same rounded inputs, so only the kernel's arithmetic is compared
    args = [t.to(dtype) for t in (x, blocks)] + [idx, bias.to(dtype)]
    for relu in (True, False):
        ref = _reference(*[t.float() if t.is_floating_point() else t for t in args], relu)
        y = block_sparse_linear(*[t.to(DEVICE) for t in args], relu=relu)
        assert y.dtype == dtype and y.shape == (batch, n_out * b)
        err = (y.float().cpu() - ref).abs().max().item()
        assert err <= TOL[dtype] * max(1.0, ref.abs().max().item()), (relu, err)
        if relu:
            assert (y >= 0).all()


def test_kernel_over_many_batch_blocks_and_strided_rows():
    """More batch blocks than one program group (8 x 128 rows), a partial last group, and an input that is a
    column slice of a wider tensor (row stride != width)."""
    blocks, idx, bias = _layer(3, 4, 2, 16, seed=1)
    wide = torch.randn(1100, 4 * 16 + 16)
    x = wide[:, 16:]
    y = block_sparse_linear(x.to(DEVICE), blocks.to(DEVICE), idx.to(DEVICE), bias.to(DEVICE))
    assert (y.cpu() - _reference(x, blocks, idx, bias, True)).abs().max().item() < 1e-4


@pytest.mark.parametrize("launch", [{"block_n": 256, "warps": 8, "stages": 2},
                                    {"block_n": 64, "warps": 4, "stages": 4}], ids=lambda l: f"rows{l['block_n']}")
def test_kernel_with_every_tuned_row_count(launch):
    """The launch settings the tuner may pick (256 rows per program included) compute the same layer; 300 rows
    leave a partial last block."""
    blocks, idx, bias = _layer(3, 4, 2, 16, seed=2)
    x = torch.randn(300, 4 * 16)
    y = block_sparse_linear(x.to(DEVICE), blocks.to(DEVICE), idx.to(DEVICE), bias.to(DEVICE), launch=launch)
    assert (y.cpu() - _reference(x, blocks, idx, bias, True)).abs().max().item() < 1e-4


def test_launch_config_takes_the_measured_setting_for_large_batches():
    tuned = {"block_n": 256, "warps": 8, "stages": 2}
    assert triton_kernel.launch_config(65536, 16, 64, 132, launch=tuned) == (256, 8, 2, False)
    # too few programs for the GPU: fewer rows per program, warps and stages for that size
    assert triton_kernel.launch_config(1024, 16, 64, 132, launch=tuned) == (32, 4, 3, False)
    # the swapped tile where the measured setting says so (a table without the key: not swapped)
    assert triton_kernel.launch_config(65536, 16, 64, 132, launch=tuned | {"swap": True}) == (256, 8, 2, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("b,rows", [(16, 16), (32, 64)])
def test_swapped_tile_computes_the_same_layer(dtype, b, rows):
    """Programs that compute the transposed tile (W^T x^T, batch rows on the MMA's wide side): the same layer,
    with a partial last batch block, a padded (repeated) tile and both epilogues (ReLU or not)."""
    blocks, idx, bias = _layer(3, 5, 3, b, seed=3)
    x = torch.randn(rows * 2 + 3, 5 * b)
    args = [t.to(dtype) for t in (x, blocks)] + [idx, bias.to(dtype)]
    launch = {"block_n": rows, "warps": 4, "stages": 2, "swap": True}
    for relu in (True, False):
        ref = _reference(*[t.float() if t.is_floating_point() else t for t in args], relu)
        y = block_sparse_linear(*[t.to(DEVICE) for t in args], relu=relu, launch=launch)
        assert y.dtype == dtype and y.shape == (x.shape[0], 3 * b)
        err = (y.float().cpu() - ref).abs().max().item()
        assert err <= TOL[dtype] * max(1.0, ref.abs().max().item()), (relu, err)


def test_packaged_launch_settings_were_measured_on_a_gpu():
    """The shipped table (``python -m g2gserve.bench.triton_tune --write``) names its GPU and command, and every
    setting is one the kernel can launch."""
    table = json.loads(triton_kernel.TUNED_PATH.read_text())
    assert table["machine"]["gpu"] and table["command"].startswith("python -m g2gserve.bench.triton_tune")
    for precision, launch in table["best"].items():
        assert precision in ("fp32", "tf32", "bf16", "fp16")
        assert launch["block_n"] >= 16 and launch["block_n"] & (launch["block_n"] - 1) == 0
        assert launch["warps"] in (1, 2, 4, 8, 16) and launch["stages"] >= 1
        assert triton_kernel.tuned_launch(precision) == launch
    assert triton_kernel.tuned_launch("fp16") == table["best"].get("fp16", table["best"].get("bf16"))


def test_tuner_picks_the_setting_fastest_over_all_layers():
    from g2gserve.bench.triton_tune import best

    def row(units, block_n, ms, swap=False):
        return {"precision": "bf16", "units": units, "batch": 1, "block_n": block_n, "warps": 4, "stages": 2,
                "swap": swap, "ms": ms}
    rows = [row(1024, 64, 2.0), row(8192, 64, 1.0),    # 2x slower on one layer
            row(1024, 128, 1.1), row(8192, 128, 1.1),  # 10% slower on both: the better geometric mean
            row(1024, 256, 0.5), row(8192, 256, None)]  # fastest once, but failed on the other layer
    choice = best(rows)["bf16"]
    assert {k: choice[k] for k in ("block_n", "warps", "stages", "swap")} == {"block_n": 128, "warps": 4, "stages": 2,
                                                                             "swap": False}
    assert choice["geomean_vs_best"] == pytest.approx(((1.1 / 0.5) * (1.1 / 1.0)) ** 0.5, abs=1e-4)
    rows += [row(1024, 128, 1.0, swap=True), row(8192, 128, 1.05, swap=True)]  # the swapped tile wins
    assert best(rows)["bf16"]["swap"] is True and best(rows)["bf16"]["block_n"] == 128


def test_launch_config_fills_the_gpu_before_amortising_weights():
    assert triton_kernel.launch_config(1, 16, 64)[0] == 16 and triton_kernel.launch_config(65536, 16, 64)[0] == 128
    assert triton_kernel.launch_config(256, 16, 64, multiprocessors=132)[0] == 16  # 16 tiles x 16 blocks >= 264
    assert triton_kernel.launch_config(1024, 16, 64, multiprocessors=132)[0] == 32  # 16 x 32 programs
    assert triton_kernel.launch_config(4096, 16, 64, multiprocessors=132)[0] == 128  # 16 x 32 programs


def test_kernel_refuses_what_it_cannot_run():
    blocks, idx, bias = _layer(2, 2, 1, 16)
    x = torch.randn(3, 32)
    with pytest.raises(ValueError, match="block size 8"):
        block_sparse_linear(torch.randn(3, 16), torch.zeros(2, 8, 8), torch.zeros(2, 1, dtype=torch.int32),
                            torch.zeros(16))
    with pytest.raises(ValueError, match="share one of"):
        block_sparse_linear(x.half(), blocks, idx, bias)
    with pytest.raises(ValueError, match="shapes do not fit"):
        block_sparse_linear(x, blocks, idx[:, :0], bias)
    with pytest.raises(ValueError, match="multiple of the block size"):
        block_sparse_linear(torch.randn(3, 40), blocks, idx, bias)


def _checkpoint(tmp_path, **kw):
    torch.manual_seed(0)
    model = build_model(tiny_config(**kw)).eval()
    with torch.no_grad():  # non-zero biases and a clear winner per image, so the gate has margins to test
        for layer in model.hidden:
            layer.bias.normal_(0, 0.5)
    ckpt = from_model(model, [str(i) for i in range(10)], Preprocess(1, 28, 28, (0.3,), (0.35,)),
                      meta={"dataset": "fashion-mnist"})
    save_checkpoint(tmp_path / "m.pt", ckpt)
    return model, tmp_path / "m.pt"


@pytest.mark.parametrize("variant", ["sparse", "dense"])
def test_triton_backend_matches_pytorch(tmp_path, variant):
    model, path = _checkpoint(tmp_path, granularity="block", block_size=16, conv_channels=16)
    packed = pack_model(model)
    net = densify(packed) if variant == "dense" else packed
    assert TritonModule(net).kernel_layers == (2 if variant == "sparse" else 0)
    assert TritonModule(net).fused_encoder and TritonModule(net).casts_input  # 1 x 7 x 7 patches, 16 channels
    m = load(path, backend="triton", device=DEVICE.type, variant=variant)
    for batch in (1, 7, 64):
        x = torch.rand(batch, 1, 28, 28)
        assert (m.logits(x).cpu() - model(x)).abs().max().item() < 1e-4
    half = load(path, backend="triton", device=DEVICE.type, variant=variant, dtype="bf16")
    x = torch.rand(64, 1, 28, 28)
    probs = torch.softmax(half.logits(x).cpu(), 1)
    assert probs.dtype == torch.float32 and (probs - torch.softmax(model(x), 1)).abs().max().item() < 0.05


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("c,size,p,ch,n", [(1, 28, 7, 32, 1), (1, 28, 7, 16, 37), (3, 32, 8, 16, 5),
                                           (3, 32, 4, 64, 70)])
def test_encoder_kernel_matches_the_reference(dtype, c, size, p, ch, n):
    """The fused patch encoder (image in place, float32 input cast in registers) against formats.encoder.encode:
    grey and RGB, 49 and 192 values per patch (padded to 64 / 256), one and several blocks of images."""
    from g2gserve.formats import encoder
    from g2gserve.runtime.triton_encoder import patch_encode
    gen = torch.Generator().manual_seed(c * size + ch)
    x = torch.randn(n, c, size, size, generator=gen)
    conv_w, conv_b = torch.randn(ch, c, p, p, generator=gen) / p, torch.randn(ch, generator=gen)
    w = torch.from_numpy(encoder.weight_matrix(conv_w.numpy())).to(dtype)
    b = conv_b.to(dtype)
    # the reference on the inputs and weights the kernel sees: rounded to dtype, products and sums in fp32
    ref = torch.from_numpy(encoder.encode(x.to(dtype).float().numpy(), conv_w.to(dtype).float().numpy(),
                                          b.float().numpy()))
    y = patch_encode(x.to(DEVICE), w.to(DEVICE), b.to(DEVICE), p)
    assert y.dtype == dtype and y.shape == (n, (size // p) ** 2 * ch)
    assert (y.float().cpu() - ref).abs().max().item() <= TOL[dtype] * ref.abs().max().item()


def test_encoder_kernel_refuses_what_it_cannot_run():
    from g2gserve.runtime.triton_encoder import patch_encode, supports
    assert supports(49, 32) and supports(192, 16) and not supports(49, 24) and not supports(49, 8)
    assert not supports(300, 32)
    x, w, b = torch.zeros(2, 1, 28, 28), torch.zeros(49, 32), torch.zeros(32)
    with pytest.raises(ValueError, match="square"):
        patch_encode(torch.zeros(2, 1, 28, 27), w, b, 7)
    with pytest.raises(ValueError, match="do not fit"):
        patch_encode(x, torch.zeros(48, 32), b, 7)
    with pytest.raises(ValueError, match="power-of-two channel count"):
        patch_encode(x, torch.zeros(49, 24), torch.zeros(24), 7)
    with pytest.raises(ValueError, match="must share"):
        patch_encode(x, w.half(), b, 7)
    assert patch_encode(torch.zeros(0, 1, 28, 28), w, b, 7).shape == (0, 16 * 32)


def test_cast_runner_leaves_the_input_to_a_module_that_casts_it_itself():
    from g2gserve.runtime.precision import cast_runner
    seen = []

    class Probe(torch.nn.Module):
        def __init__(self, casts_input):
            super().__init__()
            self.casts_input = casts_input
            self.w = torch.nn.Parameter(torch.ones(3))

        def forward(self, x):
            seen.append(x.dtype)
            return x.to(self.w.dtype) * self.w

    x = torch.rand(2, 3)
    assert cast_runner(Probe(False), "bf16")(x).dtype == torch.float32
    assert cast_runner(Probe(True), "bf16")(x).dtype == torch.float32
    assert seen == [torch.bfloat16, torch.float32]


def test_block_sizes_the_kernel_cannot_take_stay_on_torch(tmp_path):
    model, path = _checkpoint(tmp_path, granularity="block", block_size=8)
    assert not TritonModule(pack_model(model)).fused_encoder  # 8 channels: the torch encoder, input cast first
    m = load(path, backend="triton", device=DEVICE.type)
    x = torch.rand(5, 1, 28, 28)
    assert (m.logits(x).cpu() - model(x)).abs().max().item() < 1e-4


def test_each_backend_names_its_own_precisions():
    from g2gserve.runtime.precision import main as gate_main, parse_dtypes
    assert parse_dtypes("int8,int8-static", "fused") == ["int8", "int8-static"]
    assert parse_dtypes("tf32,bf16") == ["tf32", "bf16"]
    with pytest.raises(ValueError, match="unknown dtype 'int8-static'; choose one of fp32, tf32, bf16, fp16"):
        parse_dtypes("int8-static")
    with pytest.raises(ValueError, match="for the fused backend; choose one of fp32, bf16, int8, int8-static"):
        parse_dtypes("fp16", "fused")
    with pytest.raises(SystemExit):
        gate_main([".", "--backend", "fused", "--dtype", "tf32"])


def test_dtype_is_checked_where_it_cannot_apply(tmp_path):
    _, path = _checkpoint(tmp_path, granularity="block", block_size=16)
    with pytest.raises(ValueError, match="unknown dtype"):
        load(path, dtype="fp8")
    with pytest.raises(ValueError, match="computes in fp32"):
        load(path, backend="onnxruntime", dtype="bf16")


def test_agreement_rule():
    ref = np.eye(10, dtype=np.float32)[np.arange(1000) % 10] * 0.9 + 0.01
    same = agreement(ref, ref + 1e-6, "fp32")
    assert same["passed"] and same["top1_agreement"] == 1.0 and same["max_prob_diff"] == pytest.approx(1e-6, abs=1e-7)
    assert not agreement(ref, ref + 1e-3, "fp32")["passed"]  # fp32 keeps the export's 1e-4
    flipped = ref.copy()
    flipped[:4] = flipped[:4, ::-1]  # 4 of 1000 disagree: 99.6% >= 99.5%
    assert agreement(ref, flipped, "bf16")["passed"] and agreement(ref, flipped, "bf16")["top1_agreement"] == 0.996
    flipped[:6] = ref[:6, ::-1]
    worse = agreement(ref, flipped, "bf16")
    assert worse["top1_agreement"] == 0.994 < MIN_TOP1_AGREEMENT and not worse["passed"]
    broken = ref.copy()
    broken[0, 0] = np.nan
    assert not agreement(ref, broken, "fp16")["passed"]


def test_precision_gate_on_real_test_images_is_recorded(tmp_path, idx_dir, capsys):
    _, path = _checkpoint(tmp_path, granularity="block", block_size=16)
    export_checkpoint(path, tmp_path / "exp", data_dir=idx_dir)
    result = precision_gate(tmp_path / "exp", "bf16", backend="torch", device="cpu", data_dir=idx_dir)
    assert result["inputs"] == "fashion-mnist test set (64 images)" and result["images"] == 64
    assert 0 < result["max_prob_diff"] < 0.05 and result["passed"] == (result["top1_agreement"] >= 0.995)
    assert precision_main([str(tmp_path / "exp"), "--dtype", "fp32,tf32", "--data-dir", str(idx_dir), "--record",
                           "--out", str(tmp_path / "gate")]) == 0
    recorded = json.loads((tmp_path / "exp" / "manifest.json").read_text())["precision"]
    assert recorded["fp32"]["passed"] and recorded["fp32"]["max_prob_diff"] <= 1e-4
    assert recorded["tf32"]["passed"] and recorded["tf32"]["top1_agreement"] == 1.0
    assert recorded["tf32"]["rule"].startswith("top-1") and (tmp_path / "gate.md").read_text().count("| yes |") == 2
    assert read_bundle(tmp_path / "exp").manifest.precision["tf32"].passed  # the recorded manifest still loads
    assert precision_main([str(tmp_path / "exp"), "--dtype", "bf16", "--data-dir", str(tmp_path / "none")]) == 2
    assert "needs the real fashion-mnist test set" in capsys.readouterr().err


def test_gpu_benchmark_rows_and_table(monkeypatch):
    """The GPU benchmark's bookkeeping, run eagerly on this device (graphs are covered by test_triton_cuda)."""
    from g2gserve.bench import gpu

    monkeypatch.setattr(gpu, "GraphRunner", lambda fn, shape, device, max_batch: fn)
    torch.manual_seed(0)
    packed = pack_model(build_model(tiny_config(granularity="block", block_size=16)).eval())
    rows, profiles = gpu.bench_packed("tiny", packed, [1, 17], ["bf16"], 0.01, DEVICE)
    assert [(r["dtype"], r["batch"]) for r in rows] == [("bf16", 1), ("bf16", 17)]
    assert [gpu.target(n) for n in (1, 255, 256, 4095, 4096, 65536)] == [1.0, 1.0, 1.5, 1.5, 2.5, 2.5]
    for r in rows:
        dense = min(r["p50_ms"]["dense"], r["p50_ms"]["triton dense"])  # the best dense twin
        assert r["speedup"] == pytest.approx(dense / r["p50_ms"][r["best_sparse"]])
        assert r["p50_ms"][r["best_dense"]] == dense
    assert len(profiles) == 2 * sum(not r["met"] for r in rows)  # best sparse and dense, for every missed target
    assert all(p.get("error") or p["kernels"] for p in profiles)
    machine = {"gpu": None, "cpu": "x", "cores": 2, "torch": "t"}
    table = gpu.markdown({"gpu_rows": rows, "gpu_profiles": profiles, "machine": machine,
                          "command": "g2g-bench --device cuda", "triton": triton.__version__})
    assert table.count(" (>= 1.0x) |") == 2 and table.count("| tiny |") == 2 + len(profiles)


def test_export_cli_gates_and_records_precisions(tmp_path, idx_dir, capsys):
    from export.cli import main as export_main

    _, path = _checkpoint(tmp_path, granularity="block", block_size=16)
    out = tmp_path / "exp"
    assert export_main([str(path), "--out", str(out), "--data-dir", str(idx_dir), "--dtype", "tf32,fp16"]) == 0
    recorded = json.loads((out / "manifest.json").read_text())["precision"]
    assert sorted(recorded) == ["fp16", "tf32"]
    assert all(r["passed"] and r["backend"] == "torch" for r in recorded.values())
    assert "| fp16 | torch | cpu | fashion-mnist test set (64 images) |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        export_main([str(path), "--out", str(tmp_path / "x"), "--dtype", "int8"])
    assert "unknown dtype 'int8'" in capsys.readouterr().err


def test_triton_backend_refuses_the_cpu_outside_the_interpreter(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    _, path = _checkpoint(tmp_path, granularity="block", block_size=16)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    code = ("from g2gserve.runtime import load\ntry:\n    load(%r, backend='triton', device='cpu')\n"
            "except ValueError as e:\n    print(e)" % str(path))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "the triton backend runs on CUDA" in done.stdout, done.stderr[-2000:]


def test_serve_settings_refuse_a_precision_the_backend_cannot_run():
    from server.settings import ServeConfig

    with pytest.raises(ValueError, match="the onnxruntime backend computes in fp32"):
        ServeConfig(model="m", backend="onnxruntime", dtype="bf16")
    with pytest.raises(ValueError, match="the torch backend computes in fp32, tf32, bf16, fp16"):
        ServeConfig(model="m", dtype="int8")
    assert ServeConfig(model="m", backend="triton", dtype="bf16").dtype == "bf16"
    assert ServeConfig(model="m", backend="fused", dtype="int8-static").dtype == "int8-static"
    with pytest.raises(ValueError, match="the fused backend computes in fp32, bf16, int8, int8-static"):
        ServeConfig(model="m", backend="fused", dtype="fp16")


def test_kernel_compiles_for_hopper_on_the_tensor_cores_without_spills():
    """Ahead-of-time compilation for sm_90 (H100/H200) with Triton's bundled ptxas: no GPU needed. Runs in a
    fresh process, since this module put the kernel in the interpreter."""
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-m", "g2gserve.runtime.triton_kernel", "90"], capture_output=True,
                          text=True, env=env, timeout=600)
    if done.returncode != 0 and ("ptxas" in done.stderr or "ImportError" in done.stderr):
        pytest.skip(f"this Triton cannot compile ahead of time here: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout)
    encoder = [r for r in rows if r["kernel"] == "encoder"]  # the patch encoder: one dot per program, no loop
    assert {(r["dtype"], r["block_n"]) for r in encoder} == {(d, n) for d in ("fp32", "tf32", "bf16", "fp16")
                                                             for n in (16, 64)}
    assert all(r["tensor_cores"] == (r["dtype"] != "fp32") and not r["spills"] for r in encoder), encoder
    assert all(r["wgmma"] == "m64n32k" + ("8" if r["dtype"] == "tf32" else "16")
               for r in encoder if r["dtype"] != "fp32" and r["block_n"] == 64), encoder
    rows = [r for r in rows if r["kernel"] == "block"]
    measured = {d: (triton_kernel.tuned_launch(d) or {}).get("block_n", 128) for d in ("fp32", "tf32", "bf16", "fp16")}
    assert {(r["dtype"], r["block_n"], r["swap"]) for r in rows} == (
        {(d, n, False) for d in measured for n in (16, 128, measured[d])} | {(d, 256, True) for d in measured})
    assert all(r["tensor_cores"] == (r["dtype"] != "fp32") and not r["spills"] for r in rows), rows
    assert all(r["async_loads"] for r in rows), rows  # cp.async: loads pipelined behind the MMAs
    assert all(r["wgmma"] for r in rows if r["dtype"] != "fp32" and r["block_n"] >= 128), rows  # Hopper's MMA
    # the swapped tile puts 256 batch rows on the MMA's wide side: m64n256 instead of m64n64
    assert all(r["wgmma"].startswith("m64n256") for r in rows if r["swap"] and r["dtype"] != "fp32"), rows
