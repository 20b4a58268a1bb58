import json

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
