import itertools

import pytest
import torch

from g2gserve.model.masks import GRANULARITIES, GROUPINGS, group_assignment, inter_group_probability, network_masks

WIDTHS = [128, 256, 256, 256]
G, B = 4, 8


def _masks(grouping, granularity, sparsity=0.75, seed=0, structured=True):
    return network_masks(WIDTHS, G, grouping, sparsity, granularity, B, seed, structured)


@pytest.mark.parametrize("grouping,granularity", list(itertools.product(GROUPINGS, GRANULARITIES)))
def test_structure_and_exact_density(grouping, granularity):
    masks, groups = _masks(grouping, granularity)
    for k, mask in enumerate(masks):
        out_g, in_g = groups[k + 1], groups[k]
        n_out, n_in = mask.shape
        assert mask.dtype == torch.bool and (n_out, n_in) == (WIDTHS[k + 1], WIDTHS[k])
        intra = out_g[:, None] == in_g[None, :]
        assert mask[intra].all(), "intra-group connections must all be on"
        assert int(mask.sum()) == round(0.25 * n_out * n_in), "exact density"
        # inter-group edges realise p' exactly: density = 1/G + (1 - 1/G) p'
        p = inter_group_probability(0.75, G)
        assert int(mask[~intra].sum()) == round(p * int((~intra).sum()))


@pytest.mark.parametrize("grouping", GROUPINGS)
def test_block_masks_are_tiles_with_balanced_rows(grouping):
    masks, groups = _masks(grouping, "block")
    for k, mask in enumerate(masks):
        order_out = torch.argsort(groups[k + 1], stable=True)
        order_in = torch.argsort(groups[k], stable=True)
        sorted_mask = mask[order_out][:, order_in].float()
        n_out, n_in = sorted_mask.shape
        tiles = sorted_mask.view(n_out // B, B, n_in // B, B).sum((1, 3))
        assert set(tiles.unique().tolist()) <= {0.0, float(B * B)}, "tiles are all on or all off"
        per_row = (tiles > 0).sum(1)
        assert int(per_row.max() - per_row.min()) <= 1


def test_groupings():
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(group_assignment(8, 4, "index", 1, gen), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    assert torch.equal(group_assignment(8, 4, "mixer", 0, gen), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    assert torch.equal(group_assignment(8, 4, "mixer", 1, gen), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]))
    assert torch.equal(group_assignment(8, 4, "random", 0, gen), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    rnd = group_assignment(64, 4, "random", 1, gen)
    assert torch.equal(torch.bincount(rnd), torch.full((4,), 16))
    assert not torch.equal(rnd, torch.arange(64) // 16)


def test_masks_reproducible_per_seed():
    a, _ = _masks("random", "edge", seed=3)
    b, _ = _masks("random", "edge", seed=3)
    c, _ = _masks("random", "edge", seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_er_baseline_same_count_no_forced_blocks(granularity):
    g2g, _ = _masks("index", granularity)
    er, groups = _masks("index", granularity, structured=False)
    for m_g2g, m_er, k in zip(g2g, er, range(3)):
        assert int(m_er.sum()) == int(m_g2g.sum())
        intra = groups[k + 1][:, None] == groups[k][None, :]
        assert not m_er[intra].all()


def test_zero_sparsity_is_dense_and_too_sparse_is_rejected():
    masks, _ = _masks("mixer", "edge", sparsity=0.0)
    assert all(m.all() for m in masks)
    with pytest.raises(ValueError, match="density too low"):
        _masks("mixer", "edge", sparsity=0.9)
    with pytest.raises(ValueError, match="do not divide"):
        network_masks([100, 64], 3, "index", 0.5, "edge", 8, 0)
