"""MiM (Mask in Mask): multi-level views, losses and a pretrain → export → nnU-Net load round trip.

METHODS.md §6.5 invariants: (1) level-2/3 volumes are cut from hidden units of the coarser level and the labels
are those units, (2) exact hidden counts, no duplicate picks, (3) shapes and bit-exact native level 2,
(4) the positive candidate's unit contains the finer volume's footprint, (5) the reconstruction loss ignores
visible voxels and InfoNCE → 0 for logits on the labels, (6) total = Σ w_l L_R^l + α Σ L_C with the plan's
weights. Tiny cpu_smoke networks (32^3, S = 8, q = 4).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from test_masking_sparse_mae import resenc
from ssl_nnunet.experiment_planning.ssl_layout import validate_ssl_block
from ssl_nnunet.methods.mim import mim_layout
from ssl_nnunet.methods import get_method
from ssl_nnunet.methods.masking import expand_mask, num_hidden_units, per_unit_target
from ssl_nnunet.methods.helpers import split_into_cells
from ssl_nnunet.methods.mim import info_nce, min_mostly_hidden, mostly_hidden, resize_to, unit_boxes
from ssl_nnunet.utilities.errors import SSLInputError

P = [32, 32, 32]
Q = [4, 4, 4]
# median shapes giving r1 = (1, 2, 1) (the demo data), r1 = (2, 2, 2) and the small-image fallback r1 = 1
MEDIANS = {"demo": [56, 68, 60], "large": [100, 100, 100], "small": [40, 40, 40]}


def layout(kind="demo", **over):
    lay = mim_layout(P, Q, MEDIANS[kind])
    lay.update({"gamma": min(2, lay["gamma"]), "beta": 2, "proj_dim": 32})
    lay.update(over)
    return lay


def make(kind="demo", seed=0, **over):
    lay = layout(kind, **over)
    return get_method("mim")(resenc(seed=seed), {"pretrain_patch_size": P, "layout": lay}, {}, 1)


def batch_for(m, b=2, seed=1):
    return torch.randn(b, 1, *m.region, generator=torch.Generator().manual_seed(seed))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------- layout
def test_layout_rules_and_fallback():
    demo, large, small = (mim_layout(P, Q, MEDIANS[k]) for k in ("demo", "large", "small"))
    assert demo["r1"] == [1, 2, 1] and demo["level1_region"] == [32, 64, 32] and demo["level1_unit"] == [32, 16, 32]
    assert demo["level2_zoom"] == [1, 1, 1] and demo["gamma"] == 1                  # n1 = 2, >= 1 mostly hidden
    assert large["r1"] == [2, 2, 2] and large["level1_unit"] == [16, 16, 16] and large["gamma"] == 3
    # level 1 is masked on a finer grid (≈ P/6 per axis, 2q multiples): 4³ = 64 cells, 38 hidden (ρ1 0.6)
    assert demo["level1_mask_unit"] == large["level1_mask_unit"] == small["level1_mask_unit"] == [8, 8, 8]
    assert demo["ratios"][0] == 0.6
    # pigeonhole: 38 hidden of 8 units x 8 cells leave >= 3 units with >= half hidden; 2 units x 32 cells >= 1
    assert min_mostly_hidden(8, 8, 38) == 3 and min_mostly_hidden(2, 32, 38) == 1 and min_mostly_hidden(2, 4, 2) == 0
    # images smaller than 2P everywhere: X1 = P split into halves, level 2 = a hidden half zoomed x2
    assert small["r1"] == [1, 1, 1] and small["level1_region"] == P and small["level1_unit"] == [16, 16, 16]
    assert small["level2_zoom"] == [2, 2, 2]
    assert demo["u2"] == [8, 8, 8] and demo["level3_zoom"] == [4, 4, 4]              # METHODS §8 E3
    assert mim_layout([64] * 3, [8] * 3, [200] * 3)["u2"] == [16] * 3                # E4


def test_invalid_layouts_are_rejected_with_readable_messages():
    single = layout("small", level1_unit=P, level2_zoom=[1, 1, 1], gamma=1)          # n1 = 1
    with pytest.raises(SSLInputError, match="single unit"):
        get_method("mim")(resenc(), {"pretrain_patch_size": P, "layout": single}, {}, 1)
    with pytest.raises(SSLInputError, match="gamma"):
        make("demo", gamma=2)                                                         # only 1 hidden unit of 2
    with pytest.raises(SSLInputError, match="align_stride"):
        make("demo", align_stride=[16, 16, 16])
    with pytest.raises(SSLInputError, match="level1_region"):
        make("demo", level1_region=[64, 64, 64])
    block = {"total_stride": [8] * 3, "mask_quantum": Q, "methods": {"mim": {"pretrain_patch_size": P,
                                                                             "layout": layout("large", gamma=5)}}}
    with pytest.raises(SSLInputError, match="'mim', key 'gamma'"):
        validate_ssl_block_mim_only(block)


def validate_ssl_block_mim_only(block):
    """Run validate_ssl_block with the other methods filled in by a valid planner output."""
    from ssl_nnunet.experiment_planning.ssl_layout import compute_ssl_block
    full = compute_ssl_block(P, [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], [1, 1, 1], [100] * 3, "cpu_smoke", P)
    full["methods"]["mim"] = block["methods"]["mim"]
    return validate_ssl_block(full, P)


# ---------------------------------------------------------------------------------------------------- views
@pytest.mark.parametrize("kind", ["demo", "large", "small"])
def test_views_nest_in_hidden_units(kind):
    """Invariants 1-4: shapes, hidden-unit provenance, labels, bit-exact native level 2, footprints."""
    m = make(kind)
    X1 = batch_for(m)
    B, g, b = X1.shape[0], m.gamma, m.beta
    v = m.make_views(X1, gen(3))
    assert v.x1.shape == (B, 1, *P) and v.x2.shape == (B * g, 1, *P) and v.x3.shape == (B * g * b, 1, *P)
    assert v.mask1.shape == (B, 1, *m.mask_grid1) and v.mask2.shape == (B * g, 1, *m.grid2)
    assert v.mask3.shape == (B * g * b, 1, *m.grid2)
    assert torch.equal(v.x1, F.avg_pool3d(X1, m.r1, m.r1))
    # exact hidden counts per level (invariant 2)
    for mask, ratio in ((v.mask1, m.ratios[0]), (v.mask2, m.ratios[1]), (v.mask3, m.ratios[2])):
        n = mask[0].numel()
        assert torch.all((mask == 0).flatten(1).sum(1) == num_hidden_units(n, ratio))
    for i in range(B * g):
        parent, lab = i // g, int(v.label12[i])
        cells = split_into_cells(v.mask1[parent:parent + 1], m.grid1)[0, lab]           # its level-1 mask cells
        assert float((cells == 0).float().mean()) >= 0.5                               # a mostly hidden unit
        assert torch.equal(v.valid12[i], mostly_hidden(v.mask1, m.grid1)[parent])
        lo, hi = v.box12[i]
        region = X1[parent, :, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        assert list(hi - lo) == m.region2
        if m.region2 == P:
            assert torch.equal(v.x2[i], region)                                        # native, bit-exact
        else:
            assert torch.equal(v.x2[i:i + 1], resize_to(region[None], P))
        # invariant 4: in x1 coordinates the footprint is exactly the positive candidate's unit
        unit_box = unit_boxes(v.label12[i:i + 1], m.grid1, m.unit1)[0]
        assert torch.equal(unit_box * torch.tensor(m.r1), v.box12[i])
    for parent in range(B):                                                            # no duplicate picks
        labs = v.label12[parent * g:(parent + 1) * g]
        assert len(set(labs.tolist())) == g
    for i in range(B * g * b):
        parent, lab = i // b, int(v.label23[i])
        assert v.mask2.flatten(1)[parent, lab] == 0
        assert torch.equal(v.valid23[i], v.mask2.flatten(1)[parent] == 0)          # negatives: hidden units only
        lo, hi = v.box23[i]
        region = v.x2[parent, :, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        assert list(hi - lo) == m.u2
        assert torch.equal(v.x3[i:i + 1], resize_to(region[None], P))
        assert torch.equal(split_into_cells(v.x2[parent:parent + 1], m.grid2)[0, lab], region)
    for parent in range(B * g):
        assert len(set(v.label23[parent * b:(parent + 1) * b].tolist())) == b


def test_views_reproducible_with_generator():
    m = make("large")
    X1 = batch_for(m)
    a, b, c = m.make_views(X1, gen(5)), m.make_views(X1, gen(5)), m.make_views(X1, gen(6))
    for name in ("x2", "x3", "mask1", "mask2", "mask3", "label12", "label23"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not (torch.equal(a.mask1, c.mask1) and torch.equal(a.label12, c.label12) and torch.equal(a.mask2, c.mask2))


# ---------------------------------------------------------------------------------------------------- losses
def test_fused_forward_equals_per_level_forward():
    m = make("demo")
    assert m.fused
    v = m.make_views(batch_for(m, b=1), gen(0))
    for (ta, ra), (tb, rb) in zip(m.masked_forward(v, fused=True), m.masked_forward(v, fused=False)):
        assert torch.allclose(ra, rb, atol=1e-5) and torch.allclose(ta, tb, atol=1e-5)


def test_reconstruction_loss_counts_hidden_voxels_only(monkeypatch):
    """Invariant 5a: a prediction equal to the target at hidden voxels gives L_R = 0 whatever it is elsewhere."""
    m = make("demo")
    X1 = batch_for(m)
    real = m.masked_forward

    def fake(views, fused=None):
        out = real(views, fused)
        res = []
        for (x, mask, unit), (tap, rec) in zip(m._levels(views), out):
            target = per_unit_target(x, unit)
            visible = expand_mask(mask, x.shape[2:]).bool()
            res.append((tap, torch.where(visible, torch.randn_like(target) * 100, target)))
        return res

    monkeypatch.setattr(m, "masked_forward", fake)
    terms = m(X1, gen(0))
    assert terms["rec_l1"] == 0 and terms["rec_l2"] == 0 and terms["rec_l3"] == 0
    assert terms["align_12"] > 0


def test_info_nce_limits_and_stop_gradient():
    """Invariant 5b and the stop-gradient on the candidate branch."""
    n, d = 6, 16
    cand = torch.eye(n, d)[None].repeat(3, 1, 1)
    labels = torch.tensor([0, 4, 5])
    loss, logits = info_nce(cand[torch.arange(3), labels], cand, labels, tau=0.01)
    assert loss < 1e-6 and torch.equal(logits.argmax(1), labels)
    same, _ = info_nce(torch.ones(3, d), torch.ones(3, n, d), labels, tau=0.2)        # no information: log n
    assert abs(float(same) - math.log(n)) < 1e-5

    m = make("large")
    coarse = torch.randn(2, 32, 8, 8, 8, requires_grad=True)            # dec_first: C 32, stride 4
    fine = torch.randn(2 * m.gamma, 32, 8, 8, 8, requires_grad=True)
    loss, logits = m.alignment(coarse, m.grid1, fine, torch.tensor([0, 3] * m.gamma))
    assert logits.shape == (2 * m.gamma, math.prod(m.grid1))
    loss.backward()
    assert coarse.grad is None and fine.grad.abs().sum() > 0
    assert all(p.grad is not None for p in m.projector.parameters())               # projector still learns


def test_context_keeps_the_layout_and_candidates_carry_their_position():
    """Two finer volumes whose tap maps are mirror images have the same global mean: with ``context_grid`` 2³
    their contexts (and logits) differ, with [1, 1, 1] (the global mean) they cannot. Candidates of a coarse map
    that is the same everywhere differ only by their unit-position embedding; without it all logits are equal
    and the loss is log n whatever the context."""
    fine = torch.zeros(2, 32, 8, 8, 8)
    fine[0, :, :4], fine[1, :, 4:] = 1.0, 1.0                                          # mirrored along axis 0
    coarse = torch.randn(1, 32, 8, 8, 8)
    labels = torch.tensor([0, 1])
    for grid, differ in (([2, 2, 2], True), ([1, 1, 1], False)):
        m = make("large", context_grid=grid)
        _, logits = m.alignment(coarse, m.grid1, fine, labels, position=m.position12)
        assert bool(not torch.allclose(logits[0], logits[1], atol=1e-6)) == differ, grid
    flat = torch.ones(1, 32, 8, 8, 8)
    m = make("large")
    _, logits = m.alignment(flat, m.grid1, fine, labels, position=m.position12)
    assert logits[0].std() > 1e-3                                                     # positions tell units apart
    m = make("large", candidate_position=False)
    assert m.position12 is None and m.position23 is None
    loss, logits = m.alignment(flat, m.grid1, fine, labels)
    assert torch.allclose(logits, logits[:, :1].expand_as(logits)) and abs(float(loss) - math.log(8)) < 1e-5
    with pytest.raises(SSLInputError, match="context_grid"):
        make("large", context_grid=[3, 2, 2])


def test_content_free_scorer_that_knows_the_mask_gains_nothing():
    """Item 5 of issue 14: the positive is always a (mostly) hidden unit; with visible units among the negatives
    a scorer that only reads the mask beat the chance level. Now the candidates are the real ones only, so that
    scorer's loss equals the logged chance level exactly, and a scorer grading by hidden fraction is no better
    on average (labels are uniform over the candidates)."""
    m = make("large")                                                              # n1 = 8 level-1 units
    content_free, old_chance, chance12, graded, chance23 = [], [], [], [], []
    for seed in range(6):
        v = m.make_views(batch_for(m, b=8, seed=seed), gen(seed))
        for labels, valid, n in ((v.label12, v.valid12, math.prod(m.grid1)), (v.label23, v.valid23, math.prod(m.grid2))):
            cand = torch.stack([valid.float(), 1 - valid.float()], -1)               # (N, n, 2): knows the mask only
            ctx = torch.tensor([[1.0, 0.0]]).expand(len(labels), 2)
            loss, _ = info_nce(ctx, cand, labels, tau=0.01, valid=valid)
            chance = valid.float().sum(1).log().mean()
            assert abs(float(loss) - float(chance)) < 1e-5
            old, _ = info_nce(ctx, cand, labels, tau=0.01)                       # without the candidate mask
            assert float(old) < math.log(n) - 0.05                                # ... the shortcut it had
            content_free.append(float(loss)), old_chance.append(math.log(n))
        frac = 1 - split_into_cells(v.mask1, m.grid1).flatten(3).mean(3)[..., 0]  # hidden fraction (B, n1)
        frac = frac.repeat_interleave(m.gamma, 0)
        cand = torch.stack([torch.cos(3 * frac), torch.sin(3 * frac)], -1)           # graded by hidden fraction
        ctx = torch.tensor([[1.0, 0.0]]).expand(len(v.label12), 2)
        graded.append(float(info_nce(ctx, cand, v.label12, tau=0.2, valid=v.valid12)[0]))
        chance12.append(float(v.valid12.float().sum(1).log().mean()))
    assert sum(graded) / len(graded) > sum(chance12) / len(chance12) - 0.05
    t = m(batch_for(m), gen(0))
    for term in ("align_12", "align_23"):
        assert {f"{term}_chance", f"{term}_acc", f"{term}_acc_chance"} <= set(t)
        assert 0 < float(t[f"{term}_acc_chance"]) <= 1 and float(t[f"{term}_chance"]) > 0


def test_total_is_weighted_sum_from_plan():
    """Invariant 6 with non-default weights; beta = 0 drops level 3."""
    m = make("large", alpha=0.3, level_weights=[1.0, 2.0, 0.5])
    t = m(batch_for(m), gen(0))
    expect = t["rec_l1"] + 2.0 * t["rec_l2"] + 0.5 * t["rec_l3"] + 0.3 * (t["align_12"] + t["align_23"])
    assert torch.allclose(t["loss"].detach(), expect, rtol=0, atol=1e-6)
    assert t["loss"].dtype == torch.float32 and t["loss"].requires_grad
    m0 = make("large", beta=0)
    t0 = m0(batch_for(m0), gen(0))
    assert t0["rec_l3"] == 0 and t0["align_23"] == 0 and m0.num_passes() == 1 + m0.gamma


def test_loss_decreases_on_fixed_batch():
    torch.manual_seed(0)
    m = make("demo", beta=1)
    X1 = batch_for(m, b=1)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        out = m(X1, gen(0))   # same views every step
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert losses[-1] < 0.8 * losses[0], losses


def test_previews_rows():
    m = make("demo")
    rows = m.previews(batch_for(m))
    assert len(rows) == 3 and all(len(r) == 3 and r[0].shape == tuple(P) for r in rows.values())
