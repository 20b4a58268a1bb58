import argparse
import json
from pathlib import Path

from training.reproduce import main


def test_cells_table_missing_and_resume(idx_dir, tmp_path):
    common = ["--datasets", "fashion-mnist", "--seeds", "fashion-mnist=1", "--configs", "dense,g2g-mixer-set",
              "--epochs", "1", "--jobs", "2", "--fmnist-dir", str(idx_dir),
              "--fit-args", "--hidden 64,64 --groups 4 --block-size 8 --batch-size 32 --dst-interval 2",
              "--cells-dir", str(tmp_path / "cells"), "--results-dir", str(tmp_path / "results"),
              "--out", str(tmp_path / "results.md")]
    assert main(common) == 0
    cells = sorted(p.name for p in (tmp_path / "results").iterdir())
    assert cells == ["fashion-mnist__dense__seed0.json", "fashion-mnist__g2g-mixer-set__seed0.json"]
    sparse = json.loads((tmp_path / "results" / cells[1]).read_text())
    assert 0.2 < sparse["density"] < 0.3 and "training.fit" in sparse["command"]
    table = (tmp_path / "results.md").read_text()
    assert "G2G mixer + DST (magnitude prune, random regrow)" in table and "Missing" not in table
    assert (tmp_path / "results.png").stat().st_size > 1000

    (tmp_path / "results" / cells[0]).unlink()
    assert main([*common, "--table-only"]) == 0
    assert "*missing*" in (tmp_path / "results.md").read_text()
    assert not (tmp_path / "results" / cells[0]).exists()
    assert main(common) == 0  # the cell's run is complete on disk: resumed, not retrained
    assert (tmp_path / "results" / cells[0]).exists()
    assert "resuming" in (tmp_path / "cells" / "fashion-mnist" / "dense" / "seed0" / "fit.log").read_text()


def test_paired_statistics_match_the_t_table():
    from training.stats import paired, t_quantile

    # Two-sided 95% critical values of Student's t (any statistics table).
    for df, t in ((1, 12.706), (2, 4.303), (4, 2.776), (30, 2.042)):
        assert abs(t_quantile(0.975, df) - t) < 1e-3
    stats = paired({0: 1.0, 1: 2.0, 2: 3.5, 7: 0.0}, {0: 0.5, 1: 1.9, 2: 2.0})  # seed 7 has no partner
    assert stats.n == 3 and abs(stats.mean - 0.7) < 1e-12
    assert abs(stats.p - 0.2347) < 1e-3  # t = 1.681 on 2 degrees of freedom
    assert stats.ci95[0] < 0 < stats.ci95[1] and "p = 0.235 (n = 3)" in stats.describe()
    assert paired({0: 1.0}, {1: 1.0}) is None and paired({0: 1.0}, {0: 0.5}).ci95 is None


def test_regime_points_dedupe_and_fit_their_blocks():
    from training.reproduce import AXES, regime_cells, regime_points, study_point

    assert study_point("g2g-block-hebbian", AXES["groups"][2]("16")) == (("block-size", "32"), ("groups", "16"))
    assert dict(study_point("dense-params", AXES["groups"][2]("16"))) == {"block-size": "32", "groups": "16"}
    assert study_point("dense", AXES["sparsity"][2]("0.9375")) == ()  # dense ignores sparsity and G
    assert dict(study_point("er", AXES["sparsity"][2]("0.9375"))) == {"sparsity": "0.9375"}
    assert study_point("g2g-block-hebbian", AXES["dst"][2]("static")) == (("dst", "none"),)
    assert study_point("dense", AXES["dst"][2]("static")) == ()  # dense has no masks to rewire
    assert study_point("g2g-block-hebbian", AXES["dst"][2]("fade")) == (("dst-fade", "150"),)
    assert study_point("g2g-block-hebbian", AXES["dst"][2]("keep-groups")) == (("dst-keep-groups", ""),)
    points = regime_points(["epochs", "sparsity"], {}, epochs=20)
    assert points["epochs"]["20"] == {} and points["sparsity"]["0.9375"] == {"sparsity": "0.9375", "groups": "16"}
    cells = regime_cells(points, ["cifar10"], {"cifar10": 1}, ["dense", "g2g-mixer-hebbian"])
    # dense: baseline + 100 epochs (sparsity is ignored); g2g: baseline, 100 epochs, 3 other sparsities
    assert len(cells) == 2 + 5 and len({c.key for c in cells}) == len(cells)


def test_regime_study_table_plots_and_a_real_cell(idx_dir, tmp_path):
    common = ["--study", "regimes", "--datasets", "fashion-mnist", "--fmnist-dir", str(idx_dir), "--epochs", "1",
              "--configs", "dense,g2g-mixer-hebbian", "--axes", "sparsity", "--axis-values", "sparsity=0.75,0.5",
              "--fit-args", "--hidden 64,64 --groups 4 --block-size 8 --batch-size 64 --dst-interval 2",
              "--cells-dir", str(tmp_path / "cells"), "--results-dir", str(tmp_path / "results"),
              "--out", str(tmp_path / "regimes.md")]
    assert main([*common, "--seeds", "1", "--jobs", "2"]) == 0  # 3 cells: dense ignores the sparsity
    results = {p.name: json.loads(p.read_text()) for p in (tmp_path / "results").iterdir()}
    assert sorted(results) == ["fashion-mnist__dense__seed0.json", "fashion-mnist__g2g-mixer-hebbian__seed0.json",
                               "fashion-mnist__g2g-mixer-hebbian__sparsity=0.5__seed0.json"]
    half = results["fashion-mnist__g2g-mixer-hebbian__sparsity=0.5__seed0.json"]
    assert "--dst-interval 2 --sparsity 0.5 " in half["command"] and 0.45 < half["density"] < 0.55
    # Made-up accuracies for 3 seeds, so the table has paired statistics: G2G ahead at 75%, behind at 50%.
    offset = {"dense__": 0.0, "hebbian__seed": 0.01, "hebbian__sparsity": -0.02}
    for name, r in results.items():
        shift = next(v for k, v in offset.items() if k in name)
        for seed in (0, 1, 2):
            fake = r | {"seed": seed, "test_acc": 0.8 + 0.003 * seed + shift * (1 + 0.1 * seed)}
            (tmp_path / "results" / name.replace("seed0", f"seed{seed}")).write_text(json.dumps(fake))
    (tmp_path / "results" / "fashion-mnist__g2g-mixer-hebbian__sparsity=0.5__seed2.json").unlink()
    assert main([*common, "--seeds", "3", "--table-only"]) == 0
    table = (tmp_path / "regimes.md").read_text()
    assert "| Δ g2g-mixer-hebbian − dense |" in table and "(n = 2)" in table and "(n = 3)" in table
    assert "- G2G ahead: fashion-mnist sparsity=0.75" in table
    assert "- dense ahead: fashion-mnist sparsity=0.5" in table and "Missing cells (1)" in table
    assert (tmp_path / "regimes" / "sparsity.png").stat().st_size > 1000


def test_regime_study_counts_the_comparisons_own_cells_once(tmp_path):
    """The unvaried point of the study is the comparison's setting: a comparison cell trained with the same
    flags (where and how fast aside) stands for it; one trained otherwise does not."""
    from training.reproduce import Cell, comparison_results, fit_command

    comparison = tmp_path / "cells"
    comparison.mkdir()
    args = argparse.Namespace(epochs=20, threads=1, device="auto", fit_args="", fmnist_dir=None,
                              cifar_dir=Path("data/cifar"))
    same, other = Cell("dense", "cifar10", 0), Cell("er", "cifar10", 0)
    varied = Cell("dense", "cifar10", 0, (("no-augment", ""),))
    elsewhere = " ".join(["python", "-m", "training.fit", *fit_command(same, args, Path("runs/x"))[3:]])
    elsewhere = elsewhere.replace("--threads 1 --device auto", "--threads 2 --device cuda")
    for cell, command in ((same, elsewhere), (other, elsewhere.replace("--model dense", "--model er --epochs 5"))):
        (comparison / f"{cell.key}.json").write_text(json.dumps({"test_acc": 0.6, "command": command}))
    found = comparison_results([same, other, varied], args, comparison)
    assert list(found) == [same.key]  # er was trained for other epochs; the varied point is never the comparison's
    assert comparison_results([same], args, tmp_path / "absent") == {}


def test_comparison_table_pairs_hebbian_with_every_baseline_and_block_with_edge():
    from training.reproduce import CONFIGS, Cell, _paired_lines

    cells = [Cell(name, "cifar10", s) for name, _, _ in CONFIGS for s in range(3)]
    offset = {"dense": 0.0, "dense-params": -0.03, "er": -0.04, "g2g-mixer-hebbian": -0.02, "g2g-block-hebbian": -0.01}
    noise = (0.0, 0.001, -0.001)  # per seed, sparse models only: differences to dense that vary, with mean 0
    results = {c.key: {"test_acc": 0.6 + 0.01 * c.seed + offset.get(c.config, 0.0)
                                   + noise[c.seed] * (c.config != "dense")} for c in cells}
    lines = "\n".join(_paired_lines(cells, results, "cifar10"))
    assert "- G2G mixer + DST Hebbian − dense: -2.00 ± 0.10" in lines
    assert "- G2G mixer, block 64x64 tiles + DST Hebbian − dense-params: +2.0" in lines
    assert "- G2G mixer, block 64x64 tiles + DST Hebbian − er: +3.0" in lines
    assert "- G2G mixer, block 64x64 tiles + DST Hebbian − G2G mixer + DST Hebbian: +1.0" in lines
    assert lines.count("(n = 3)") == 7
