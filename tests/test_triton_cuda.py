"""CUDA graphs per batch bucket and precision on the GPU: skipped without CUDA (``make gpu-check`` runs them)."""
import pytest
import torch

from g2gserve.data.preprocess import Preprocess
from g2gserve.model.checkpoint import from_model, save_checkpoint
from g2gserve.model.g2gnet import build_model
from g2gserve.runtime import load
from g2gserve.runtime.cuda_graphs import GraphRunner, buckets
from g2gserve.runtime.precision import allows_tf32, matmul_precision

from conftest import tiny_config

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_buckets_are_powers_of_two_covering_max_batch():
    assert buckets(1) == [1] and buckets(32) == [1, 2, 4, 8, 16, 32] and buckets(33)[-1] == 64
    with pytest.raises(ValueError):
        buckets(0)


def test_matmul_precision_is_scoped_and_consistent():
    before = allows_tf32()
    with matmul_precision("tf32"):
        assert allows_tf32() and torch.get_float32_matmul_precision() == "high"
        if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9: both settings agree
            assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        with matmul_precision("fp32"):
            assert not allows_tf32()
        assert allows_tf32()
    assert allows_tf32() == before and torch.get_float32_matmul_precision() in ("high", "highest")


@needs_cuda
def test_graph_runner_pads_to_buckets_and_chunks_large_batches():
    dev = torch.device("cuda")
    w = torch.randn(12, 5, device=dev)
    calls = []

    def ref(x):
        return torch.relu(x.view(x.shape[0], -1) @ w)

    def fn(x):
        calls.append(x.shape[0])
        return ref(x)

    runner = GraphRunner(fn, (3, 4), dev, max_batch=8)
    for n in (1, 3, 8, 8, 21):  # 21 rows: chunks of 8, 8 and 5 (padded to 8)
        x = torch.randn(n, 3, 4, device=dev)
        assert torch.allclose(runner(x), ref(x), atol=1e-5)
    assert calls == [1] * 3 + [4] * 3 + [8] * 3  # each bucket traced once (2 warm-ups + capture), then replayed
    out = runner(torch.ones(2, 3, 4, device=dev))
    runner(torch.zeros(2, 3, 4, device=dev))
    assert out.abs().sum() > 0  # a returned batch is a copy, not the graph's static output
    with pytest.raises(ValueError, match="expected input"):
        runner(torch.zeros(2, 4, 3, device=dev))


@needs_cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("variant", ["sparse", "dense"])
def test_graphs_and_precisions_match_pytorch_on_cuda(tmp_path, backend, variant):
    torch.manual_seed(0)  # 16 encoder channels: the triton backend's fused encoder runs (in graphs too)
    model = build_model(tiny_config(granularity="block", block_size=16, conv_channels=16)).eval()
    save_checkpoint(tmp_path / "m.pt", from_model(model, [str(i) for i in range(10)],
                                                 Preprocess(1, 28, 28, (0.3,), (0.35,))))
    x = torch.rand(37, 1, 28, 28)
    ref = model(x)
    for dtype, tol in (("fp32", 1e-4), ("tf32", 2e-2), ("bf16", 5e-2), ("fp16", 1e-2)):
        for max_batch in (None, 16):  # eager, then graphs (37 rows = 2 chunks of 16 + 5 padded to 8)
            m = load(tmp_path / "m.pt", backend=backend, device="cuda", variant=variant, dtype=dtype,
                     max_batch=max_batch)
            for rows in (x[:1], x):
                err = (m.logits(rows).cpu() - ref[:len(rows)]).abs().max().item()
                assert err < tol * max(1.0, ref.abs().max().item()), (dtype, max_batch, len(rows), err)


@needs_cuda
def test_serve_on_cuda_with_graphs_and_bf16(tmp_path):
    pytest.importorskip("fastapi", reason="the server extra is not installed")
    from fastapi.testclient import TestClient

    from g2gserve.data.images import encode_png
    from g2gserve.export import export_checkpoint
    from server.app import ServeConfig, create_app

    torch.manual_seed(0)
    model = build_model(tiny_config(granularity="block", block_size=16)).eval()
    save_checkpoint(tmp_path / "m.pt", from_model(model, [str(i) for i in range(10)],
                                                 Preprocess(1, 28, 28, (0.3,), (0.35,))))
    export_checkpoint(tmp_path / "m.pt", tmp_path / "exp")
    image = torch.randint(0, 256, (1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    offline = load(tmp_path / "exp", backend="triton", device="cuda", dtype="bf16").predict(image[None])[0]
    cfg = ServeConfig(model=str(tmp_path / "exp"), backend="triton", device="cuda", dtype="bf16", max_batch=8,
                      calibration_seconds=0.05, memory_probe=False)
    with TestClient(create_app(cfg)) as client:
        r = client.post("/classify?top_k=1", content=encode_png(image), headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"]["backend"] == "triton" and body["model"]["device"].startswith("cuda")
        assert body["predictions"][0]["class_id"] == int(torch.as_tensor(offline).argmax())
