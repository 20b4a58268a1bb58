import itertools

import pytest
import torch
import torch.nn.functional as F

from g2gserve.model.masks import tile_order, to_tiles
from g2gserve.model.g2gnet import build_model
from training.dst import PRUNE, REGROW, DSTConfig, MaskScheduler
from training.hebbian import HebbianTracker

from conftest import TINY_FLAGS, tiny_config


def _train(model, sched, opt, steps, seed=0, check=None):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 1, 28, 28, generator=gen)
        y = torch.randint(0, 10, (16,), generator=gen)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if check is not None:
            check()


def _setup(granularity="edge", prune="magnitude", regrow="hebbian", **kw):
    torch.manual_seed(0)
    model = build_model(tiny_config(granularity=granularity))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    cfg = DSTConfig(prune=prune, regrow=regrow, interval=kw.pop("interval", 5), window=3, fraction=0.3, **kw)
    return model, opt, MaskScheduler(model, opt, cfg, total_steps=40, seed=0)


@pytest.mark.parametrize("granularity,prune,regrow", list(itertools.product(("edge", "block"), PRUNE, REGROW)))
def test_invariants_after_every_update(granularity, prune, regrow):
    model, opt, sched = _setup(granularity, prune, regrow)
    counts = [int(l.mask.sum()) for l in model.hidden]
    groups = model.groups
    orders = [tile_order(g) for g in groups]
    seen = []

    def check():
        if not sched.records or sched.records[-1]["step"] != sched.step:
            return
        seen.append(sched.step)
        for k, layer in enumerate(model.hidden):
            assert int(layer.mask.sum()) == counts[k], "edge count must stay exact"
            assert torch.count_nonzero(layer.weight[~layer.mask]) == 0, "masked weights stay zero"
            if granularity == "block":
                tiles = to_tiles(layer.mask.float(), orders[k + 1], orders[k], 8).sum((2, 3))
                assert set(tiles.unique().tolist()) <= {0.0, 64.0}, "whole tiles only"
                per_row = (tiles > 0).sum(1)
                assert int(per_row.max() - per_row.min()) <= 1
    _train(model, sched, opt, 40, check=check)
    assert seen == [5, 10, 15, 20, 25, 30]  # every interval until 75% of 40 steps
    assert all(r["moved"] > 0 for r in sched.records if r["fraction"] > 0.05)
    assert sched.records[-1]["turnover"] > 0


def test_optimizer_state_is_reset_for_moved_edges():
    model, opt, sched = _setup(interval=1000)
    _train(model, sched, opt, 3)
    before = [l.mask.clone() for l in model.hidden]
    sched.step = 5
    sched.update()
    for layer, old in zip(model.hidden, before):
        changed = old ^ layer.mask
        assert changed.any()
        state = opt.state[layer.weight]
        assert torch.count_nonzero(state["exp_avg"][changed]) == 0
        assert torch.count_nonzero(state["exp_avg_sq"][changed]) == 0
        assert torch.count_nonzero(layer.weight[changed]) == 0
        # pruned weights do not come back through momentum on the next steps
    _train(model, sched, opt, 3, seed=1)
    for layer in model.hidden:
        assert torch.count_nonzero(layer.weight[~layer.mask]) == 0


def test_fade_shrinks_pruned_weights_linearly_then_removes_them():
    """With ``fade`` the pruned tiles stay in the mask, shrinking to zero over ``fade`` steps, then leave it
    (lr 0: only the fade moves the weights, so the ramp is exact); the regrown ones join at once."""
    torch.manual_seed(0)
    model = build_model(tiny_config(granularity="block"))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    cfg = DSTConfig(interval=5, window=3, fraction=0.3, fade=3)
    sched = MaskScheduler(model, opt, cfg, total_steps=40, seed=0)
    counts = [int(l.mask.sum()) for l in model.hidden]
    _train(model, sched, opt, 4)
    before = [(l.mask.clone(), l.weight.detach().clone()) for l in model.hidden]
    _train(model, sched, opt, 1)  # step 5: the update
    cuts = []
    for layer, (mask, weight), n, cut in zip(model.hidden, before, counts, sched._fading):
        grown = layer.mask & ~mask
        assert not (mask & ~layer.mask).any(), "pruned tiles stay in the mask while they fade"
        assert not (cut & ~mask).any() and int(cut.sum()) == int(grown.sum()) > 0
        assert int(layer.mask.sum()) == n + int(cut.sum())
        assert torch.equal(layer.weight[cut], weight[cut]) and torch.count_nonzero(layer.weight[grown]) == 0
        cuts.append((cut, weight))
    for step, share in ((6, 2 / 3), (7, 1 / 3)):
        _train(model, sched, opt, 1)
        for layer, (cut, weight) in zip(model.hidden, cuts):
            assert torch.allclose(layer.weight[cut], weight[cut] * share, atol=1e-7), step
    _train(model, sched, opt, 1)  # step 8: gone
    for layer, (cut, _), n in zip(model.hidden, cuts, counts):
        assert int(layer.mask.sum()) == n and not (layer.mask & cut).any()
        assert torch.count_nonzero(layer.weight[~layer.mask]) == 0
    assert sched._fading is None and [r["moved"] for r in sched.records] == [int(c.sum()) for c, _ in cuts]


def test_fade_never_outlasts_training():
    """An update closer to the end than ``fade`` steps prunes at once: the model ends exactly sparse."""
    model, opt, sched = _setup("block", interval=5, fade=4, end=1.0)
    counts = [int(l.mask.sum()) for l in model.hidden]
    _train(model, sched, opt, 40)
    assert sched.records[-1]["step"] == 40 and sched._fading is None
    assert [int(l.mask.sum()) for l in model.hidden] == counts


@pytest.mark.parametrize("granularity", ["edge", "block"])
def test_keep_groups_moves_only_connections_across_groups(granularity):
    torch.manual_seed(0)
    model = build_model(tiny_config(granularity=granularity, sparsity=0.5))  # 75% would leave nothing across
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = MaskScheduler(model, opt, DSTConfig(interval=5, window=3, keep_groups=True), total_steps=40, seed=0)
    intra = [m & l.mask for m, l in zip(sched.intra, model.hidden)]  # each group's own live wiring
    assert all(m.any() for m in intra)
    counts = [int(l.mask.sum()) for l in model.hidden]
    _train(model, sched, opt, 40)
    for layer, own, n in zip(model.hidden, intra, counts):
        assert torch.equal(layer.mask & own, own), "no in-group connection was pruned"
        assert int(layer.mask.sum()) == n
    assert all(r["moved"] > 0 for r in sched.records if r["fraction"] > 0.05)
    assert sched.records[-1]["turnover"] > 0


def test_hebbian_score_matches_brute_force():
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 4)
    layer.out_features, layer.in_features = 4, 5
    tracker = HebbianTracker([layer], beta=0.5)
    tracker.active = True
    batches = [torch.rand(3, 5) for _ in range(3)]
    for x in batches:
        layer(x)
    score = tracker.score(0).clone()
    assert tracker.batches == 3
    tracker.active = False
    # Reference with explicit loops: EMA of sums, then cosine.
    s = torch.zeros(4, 5)
    p = torch.zeros(4)
    q = torch.zeros(5)
    for x in batches:
        post = torch.relu(layer(x)).detach()
        for i in range(4):
            for j in range(5):
                s[i, j] = 0.5 * s[i, j] + 0.5 * sum(float(post[b, i] * x[b, j]) for b in range(3))
            p[i] = 0.5 * p[i] + 0.5 * float((post[:, i] ** 2).sum())
        for j in range(5):
            q[j] = 0.5 * q[j] + 0.5 * float((x[:, j] ** 2).sum())
    ref = s / torch.sqrt(torch.outer(p, q) + 1e-12)
    assert torch.allclose(score, ref, atol=1e-5)
    assert tracker.batches == 3, "hooks are idle outside the window"


def test_dst_is_deterministic_with_a_seed():
    runs = []
    for _ in range(2):
        model, opt, sched = _setup(prune="mixed", regrow="random")
        _train(model, sched, opt, 20)
        runs.append([l.mask.clone() for l in model.hidden])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_dst_config_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown prune"):
        DSTConfig(prune="biggest")
    with pytest.raises(ValueError, match="dst-fraction"):
        DSTConfig(fraction=1.5)
    with pytest.raises(ValueError, match="dst-fade"):
        DSTConfig(interval=100, fade=100)


@pytest.mark.parametrize("interval,fade", [(3, 0), (4, 3)])  # 8 steps an epoch: (4, 3) stops in a fade
def test_resume_in_the_middle_of_a_dst_schedule(idx_dir, tmp_path, interval, fade):
    from g2gserve.model.checkpoint import load_model
    from training.fit import main
    torch.set_num_threads(1)
    flags = ["--data-dir", str(idx_dir), *TINY_FLAGS, "--epochs", "3", "--dst", "hebbian", "--dst-interval",
             str(interval), "--dst-end", "0.9", "--seed", "2", "--dst-fade", str(fade)]
    assert main([*flags, "--out", str(tmp_path / "a")]) == 0
    assert main([*flags, "--out", str(tmp_path / "b"), "--stop-after", "1"]) == 0
    assert torch.load(tmp_path / "b" / "state.pt", weights_only=True)["dst"]["fade_left"] == fade
    assert main(["--out", str(tmp_path / "b"), "--resume", "--data-dir", str(idx_dir), "--no-progress"]) == 0
    a, ca = load_model(tmp_path / "a" / "model.pt")
    b, cb = load_model(tmp_path / "b" / "model.pt")
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(ta, tb), name
    assert ca.meta["dst_records"] == cb.meta["dst_records"] and len(ca.meta["dst_records"]) > 3
    assert (tmp_path / "b" / "dst.jsonl").read_text() == (tmp_path / "a" / "dst.jsonl").read_text()
    assert (tmp_path / "a" / "training.png").stat().st_size > 1000
