import json

import pytest
import torch

from g2gserve.bench.measure import Latency, interleaved, pairwise_speedup, peak_memory
from g2gserve.export import export_checkpoint
from server.bench import break_even, main

from test_export import _checkpoint


def test_interleaving_alternates_and_counts():
    calls = []
    times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=2,
                        min_iters=5, max_iters=5, seconds=0)
    assert calls == ["a", "b"] * 7  # 2 warm-up rounds, then 5 timed A B rounds
    assert [len(v) for v in times.values()] == [5, 5]


def test_backends_take_turns_in_chunks_of_strict_pairs(tmp_path, monkeypatch):
    import g2gserve.bench.measure as measure
    import server.bench as bench
    turns = []

    def spy(runs, **kw):
        turns.append(list(runs))
        times = interleaved(runs, **kw)
        assert kw["min_iters"] == 7 and all(len(v) >= 7 for v in times.values())  # 20 samples over 3 chunks
        return times
    monkeypatch.setattr(measure, "interleaved", spy)
    monkeypatch.setattr(measure, "CHUNK_SECONDS", 0.01)
    _, _, path = _checkpoint(tmp_path, granularity="block")
    result = bench.bench_model(path, ["torch", "onnxruntime"], [1, 3], "cpu", 1, 0.03, memory=False)
    assert turns == [["sparse", "dense"]] * 12  # 2 batch sizes x 3 chunks x 2 backends, each chunk A B A B
    for run in result["runs"]:
        assert run["sparse"]["samples"] == run["dense"]["samples"] >= 21 and run["speedup"] > 0


def test_latency_percentiles_and_pairwise_speedup():
    lat = Latency.of([i / 1000 for i in range(1, 101)])
    assert (lat.p50_ms, lat.p99_ms, lat.samples) == (pytest.approx(51, abs=1), pytest.approx(99, abs=1), 100)
    assert pairwise_speedup([1, 2, 4], [3, 6, 4]) == 3.0


def test_memory_probe_runs_in_a_fresh_process(tmp_path):
    _, _, path = _checkpoint(tmp_path, granularity="block")
    m = peak_memory(str(path), "torch", "sparse", 4)
    assert m["vmhwm_bytes"] > 50 * 2**20  # a real process with torch loaded, not the parent's number
    export_checkpoint(path, tmp_path / "exp")
    slim = peak_memory(str(tmp_path / "exp"), "onnxruntime", "sparse", 4, slim=True)
    assert slim["slim"] and not slim["torch_imported"] and m["torch_imported"]
    assert slim["vmhwm_bytes"] < m["vmhwm_bytes"]  # without torch: how big is not the point, only that it is gone


def test_cli_writes_json_table_and_plot(tmp_path, capsys):
    _, _, path = _checkpoint(tmp_path, granularity="block")
    out = tmp_path / "bench"
    assert main([str(path), "--batch-sizes", "1,3", "--seconds", "0.05", "--out", str(out)]) == 0
    result = json.loads((out / "bench.json").read_text())
    assert {"machine", "threads", "runs", "best", "memory", "sizes", "command"} <= set(result)
    assert result["threads"] == 1 and result["machine"]["cores"] >= 1
    assert {(r["backend"], r["batch"]) for r in result["runs"]} == {(b, n) for b in ("torch", "onnxruntime", "fused") for n in (1, 3)}
    run = result["runs"][0]
    assert run["sparse"]["samples"] == run["dense"]["samples"] >= 20 and run["speedup"] > 0
    assert {(m["backend"], m["variant"]) for m in result["memory"]} == {(b, v) for b in ("torch", "onnxruntime", "fused")
                                                                       for v in ("sparse", "dense")}
    assert result["sizes"]["stored_weight_bytes"] < result["sizes"]["dense_weight_bytes"]
    assert (out / "bench.png").stat().st_size > 1000
    assert "Best sparse backend" in (out / "bench.md").read_text() and "speedup" in capsys.readouterr().out


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([])
    assert "give a MODEL" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nope")])
    assert "no such export" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--backends", "tensorrt"])
    assert "unknown backend" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_cuda_is_refused_cleanly_without_a_gpu(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--device", "cuda"])
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_path(tmp_path):
    _, _, path = _checkpoint(tmp_path, granularity="block")
    assert main([str(path), "--device", "cuda", "--batch-sizes", "1,8", "--dtypes", "fp32,bf16", "--seconds", "0.05",
                 "--sweep", "--sweep-hidden", "1024", "--out", str(tmp_path / "b")]) == 0
    result = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert result["machine"]["gpu"] and len(result["gpu_rows"]) == 2 * 2 * 2  # 2 models x 2 dtypes x 2 batches
    assert all(r["speedup"] > 0 for r in result["gpu_rows"]) and "| model | precision |" in (tmp_path / "b" / "bench.md").read_text()


def test_break_even_interpolates():
    rows = [{"format": "csr", "batch": 1, "sparsity": s, "speedup": v} for s, v in ((0.5, 0.5), (0.75, 0.8), (0.875, 1.2))]
    assert break_even(rows, "csr", 1) == "81.2%"
    assert break_even([dict(r, speedup=2.0) for r in rows], "csr", 1) == "<= 50.00%"
    assert break_even([dict(r, speedup=0.5) for r in rows], "csr", 1) == "> 87.50%"


def test_sweep_smoke(tmp_path, monkeypatch):
    import server.bench as bench
    monkeypatch.setattr(bench, "SWEEP_SPARSITIES", (0.5, 0.9375))
    assert main(["--sweep", "--batch-sizes", "2", "--seconds", "0.01", "--out", str(tmp_path / "s")]) == 0
    rows = json.loads((tmp_path / "s" / "bench.json").read_text())["sweep"]
    assert {(r["format"], r["sparsity"]) for r in rows} == {(f, s) for f in ("block", "csr") for s in (0.5, 0.9375)}


def test_run_length_times_warm_runs_and_pairs_them():
    calls = []
    times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=1, min_iters=6,
                        max_iters=6, seconds=0, run_length=3)
    assert len(times["a"]) == len(times["b"]) == 6
    # warm-up a b, then per round: one uncounted call + 3 timed calls of each model
    assert calls == ["a", "b"] + (["a"] * 4 + ["b"] * 4) * 2
    with pytest.raises(ValueError):
        interleaved({"a": lambda: None}, run_length=0)


def test_onnxruntime_node_profile(tmp_path, capsys):
    _, _, path = _checkpoint(tmp_path, granularity="block")
    export_checkpoint(path, tmp_path / "exp")
    assert main([str(tmp_path / "exp"), "--batch-sizes", "2", "--backends", "onnxruntime", "--seconds", "0.05",
                 "--no-memory", "--profile", "--out", str(tmp_path / "b")]) == 0
    prof = json.loads((tmp_path / "b" / "bench.json").read_text())["profile"]
    assert [p["graph"] for p in prof] == ["model.onnx", "dense.onnx"]
    sparse, dense = prof
    assert "Gather" in sparse["by_op_us"] and "Gather" not in dense["by_op_us"]
    assert sparse["nodes"] > dense["nodes"] and 0 < sparse["nodes_us"] and sparse["run_us"] > 0
    assert "node profile" in (tmp_path / "b" / "bench.md").read_text()
    with pytest.raises(SystemExit):
        main([str(path), "--profile"])
    assert "needs an export directory" in capsys.readouterr().err
