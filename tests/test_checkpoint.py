import pytest
import torch

from g2gserve.model.checkpoint import CheckpointError, from_model, load_checkpoint, load_model, save_checkpoint
from g2gserve.model.g2gnet import build_model
from g2gserve.data.preprocess import Preprocess

from conftest import tiny_config

PRE = Preprocess(1, 28, 28, (0.3,), (0.35,))
CLASSES = [f"c{i}" for i in range(10)]


def _saved(tmp_path, **kw):
    torch.manual_seed(0)
    model = build_model(tiny_config(**kw))
    path = tmp_path / "model.pt"
    save_checkpoint(path, from_model(model, CLASSES, PRE, [{"epoch": 1, "test_acc": 0.5}], seed=7))
    return model, path


@pytest.mark.parametrize("kind", ["g2g", "dense", "dense-params", "er"])
def test_round_trip(tmp_path, kind):
    model, path = _saved(tmp_path, kind=kind)
    loaded, ckpt = load_model(path)
    x = torch.randn(3, 1, 28, 28)
    model.eval()
    assert torch.equal(loaded(x), model(x))
    assert ckpt.config == model.cfg and ckpt.classes == CLASSES and ckpt.preprocess == PRE
    assert ckpt.history[0]["test_acc"] == 0.5 and ckpt.seed == 7
    assert ckpt.meta["versions"]["torch"] == torch.__version__


def test_rewired_masks_survive_the_round_trip(tmp_path):
    model = build_model(tiny_config())
    with torch.no_grad():
        model.hidden[0].mask[0].logical_not_()  # as a DST update would
        model.hidden[0].apply_mask_()
    path = tmp_path / "m.pt"
    save_checkpoint(path, from_model(model, CLASSES, PRE))
    loaded, _ = load_model(path)
    assert torch.equal(loaded.hidden[0].mask, model.hidden[0].mask)


def test_loads_with_weights_only(tmp_path):
    _, path = _saved(tmp_path)
    obj = torch.load(path, weights_only=True)
    assert obj["format"] == "g2gserve.checkpoint"


def test_corrupt_foreign_and_missing_files_are_named(tmp_path):
    _, path = _saved(tmp_path)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated.pt: not a readable"):
        load_checkpoint(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_checkpoint(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(CheckpointError, match="foreign.pt: not a g2gserve checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="nope.pt: no such file"):
        load_checkpoint(tmp_path / "nope.pt")


def test_pickled_code_is_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"format": "g2gserve.checkpoint", "x": Preprocess}, evil)  # a class: needs full pickle
    with pytest.raises(CheckpointError, match="evil.pt: not a readable"):
        load_checkpoint(evil)


def test_mismatched_weights_are_rejected(tmp_path):
    _, path = _saved(tmp_path)
    obj = torch.load(path, weights_only=True)
    obj["config"]["hidden"] = [128, 128]
    bad = tmp_path / "bad.pt"
    torch.save(obj, bad)
    with pytest.raises(CheckpointError, match="bad.pt: .*shape"):
        load_model(bad)


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    model, path = _saved(tmp_path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint(path, from_model(model, CLASSES, PRE))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_groups_travel_with_the_checkpoint_and_nothing_redraws_them(tmp_path, monkeypatch):
    """Packing and loading use the stored unit groups: a change in the RNG could not turn block packing into dense."""
    from g2gserve.formats import pack_model
    import g2gserve.model.g2gnet as g2gnet
    model, path = _saved(tmp_path, grouping="random", granularity="block")
    monkeypatch.setattr(g2gnet, "network_masks", lambda *a, **k: pytest.fail("masks/groups redrawn from the seed"))
    loaded, ckpt = load_model(path)
    assert all(torch.equal(a, b) for a, b in zip(ckpt.groups, model.groups))
    packed = pack_model(loaded)
    assert [l.format for l in packed.layers] == ["block", "block"]
    assert [o.tolist() for o in packed.unit_orders] == [torch.argsort(g, stable=True).tolist() for g in model.groups]


def test_old_checkpoint_without_groups_derives_them_once_with_a_warning(tmp_path):
    model, path = _saved(tmp_path, grouping="random", granularity="block")
    obj = torch.load(path, weights_only=True)
    del obj["groups"]
    torch.save(obj, path)
    with pytest.warns(UserWarning, match="deriving them once from mask_seed"):
        ckpt = load_checkpoint(path)
    assert all(torch.equal(a, b) for a, b in zip(ckpt.groups, model.groups))


@pytest.mark.parametrize("groups,message", [
    (lambda g: g[:-1], "list of 3 tensors"),
    (lambda g: [g[0].int(), *g[1:]], "must be int64"),
    (lambda g: [g[0], g[1].clone().fill_(0), g[2]], "not 4 groups of 16 units"),
    (lambda g: [g[0], g[1] + 4, g[2]], "not 4 groups"),
])
def test_damaged_groups_are_refused(tmp_path, groups, message):
    _, path = _saved(tmp_path)
    obj = torch.load(path, weights_only=True)
    obj["groups"] = groups(obj["groups"])
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)
