"""SCORE core algorithms: rewards, split advantage, loss, top-K selection and the policy network.

Unit tests plus hypothesis property tests; CPU, tiny shapes, a few seconds in all.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.select import SelectionContext, budget
from pipeline.config import PolicyConfig, StageConfig, load_config
from pipeline.loss import clipped_surrogate_loss
from pipeline.policy import ScorePolicy, surprise_state, video_scale
from pipeline.rewards import (
    bernoulli_entropy,
    bernoulli_logprob,
    budget_shift,
    delta_ce,
    pack_masks,
    sample_masks,
    sparsity,
    split_advantage,
    token_logprob,
    unpack_masks,
)
from pipeline.select import make_score_selector, topk_keep

PROP = settings(max_examples=60, deadline=None)
EPS = 1e-6


def _adv(dce, rho, penalty=1.0, scale=False):
    return split_advantage(torch.tensor(dce, dtype=torch.float64)[None], torch.tensor(rho, dtype=torch.float64)[None],
                           penalty, EPS, scale)[0]


# ------------------------------------------------------------------------------ delta-CE, sparsity
@pytest.mark.unit
def test_delta_ce_tolerance():
    ce_full = torch.tensor([2.0, 0.0])
    ce = torch.tensor([[2.0, 2.3, 2.1], [0.04, 0.06, 0.0]])
    d = delta_ce(ce_full, ce, tau_abs=0.05, tau_rel=0.05)  # tau = 0.15 and 0.05
    assert torch.allclose(d, torch.tensor([[0.15, -0.15, 0.05], [0.01, -0.01, 0.05]]), atol=1e-6)


@pytest.mark.unit
def test_sparsity_with_and_without_valid():
    m = torch.tensor([[[1, 0, 0, 1], [1, 1, 1, 1]]], dtype=torch.bool)
    assert torch.allclose(sparsity(m), torch.tensor([[0.5, 0.0]]))
    valid = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    assert torch.allclose(sparsity(m, valid), torch.tensor([[2 / 3, 0.0]]))


# ------------------------------------------------------------------------------ split advantage
@pytest.mark.unit
def test_all_safe_group_is_standardised():
    rho = [0.2, 0.4, 0.6, 0.8]
    a = _adv([1.0] * 4, rho)
    r = torch.tensor(rho, dtype=torch.float64)
    assert torch.allclose(a, (r - r.mean()) / (r.std(unbiased=False) + EPS))
    assert abs(float(a.mean())) < 1e-9 and torch.all(a[1:] > a[:-1])


@pytest.mark.unit
def test_all_violating_group_is_sparsity_penalty():
    a = _adv([-0.1, -1.0, 0.0], [0.9, 0.5, 0.1], penalty=2.0)  # dCE == 0 counts as a violation
    assert torch.allclose(a, torch.tensor([-1.8, -1.0, -0.2], dtype=torch.float64))
    b = _adv([-0.1, -1.0, 0.0], [0.9, 0.5, 0.1], penalty=2.0, scale=True)
    assert torch.allclose(b, torch.tensor([-0.18, -1.0, -0.0], dtype=torch.float64))


@pytest.mark.unit
def test_singleton_safe_and_zero_spread_give_zero():
    a = _adv([0.3, -0.2, -0.5], [0.7, 0.5, 0.9])
    assert a[0] == 0 and a[1] == pytest.approx(-0.5) and a[2] == pytest.approx(-0.9)
    z = _adv([0.3, 0.2, -0.5, 0.1], [0.3, 0.3, 0.9, 0.3])
    assert z[0] == 0 and z[1] == 0 and z[3] == 0 and z[2] == pytest.approx(-0.9)


@pytest.mark.unit
def test_two_safe_rollouts_get_plus_minus_one():
    a = _adv([0.1, 0.2], [0.25, 0.75])
    assert torch.allclose(a, torch.tensor([-1.0, 1.0], dtype=torch.float64), atol=1e-5)


@pytest.mark.unit
def test_split_advantage_rejects_nan():
    with pytest.raises(ValueError, match="non-finite"):
        split_advantage(torch.tensor([[float("nan"), 1.0]]), torch.tensor([[0.1, 0.2]]), 1.0, EPS)


groups = st.integers(2, 12).flatmap(lambda g: st.tuples(
    st.lists(st.floats(-3, 3, allow_nan=False).filter(lambda x: abs(x) > 1e-3), min_size=g, max_size=g),
    st.lists(st.integers(0, 64).map(lambda k: k / 64), min_size=g, max_size=g),
    st.floats(0, 5),
    st.booleans(),
))


@PROP
@given(groups)
@pytest.mark.unit
def test_split_advantage_invariants(case):
    dce, rho, lam, scale = case
    a = _adv(dce, rho, lam, scale)
    d, r = torch.tensor(dce, dtype=torch.float64), torch.tensor(rho, dtype=torch.float64)
    safe = d > 0
    assert torch.isfinite(a).all()
    # violating: <= 0, and (unscaled) sparser is at least as negative
    assert torch.all(a[~safe] <= 0)
    if not scale:
        rv, av = r[~safe], a[~safe]
        for i in range(len(rv)):
            for j in range(len(rv)):
                if rv[i] > rv[j]:
                    assert av[i] <= av[j]
    # safe: zero-mean; strictly increasing in rho when defined, else all zero
    rs, as_ = r[safe], a[safe]
    if len(rs) <= 1 or float(rs.max()) == float(rs.min()):
        assert torch.all(as_ == 0)
    else:
        assert abs(float(as_.mean())) < 1e-6
        for i in range(len(rs)):
            for j in range(len(rs)):
                if rs[i] > rs[j]:
                    assert as_[i] > as_[j]
                elif rs[i] == rs[j]:
                    assert as_[i] == as_[j]


@PROP
@given(st.integers(1, 3), st.integers(2, 6), st.integers(0, 10_000))
@pytest.mark.unit
def test_split_advantage_is_per_row(b, g, seed):
    gen = torch.Generator().manual_seed(seed)
    d, r = torch.randn(b, g, generator=gen), torch.rand(b, g, generator=gen)
    full = split_advantage(d, r, 1.0, EPS)
    for i in range(b):
        assert torch.equal(full[i], split_advantage(d[i:i + 1], r[i:i + 1], 1.0, EPS)[0])


# ------------------------------------------------------------------------------ Bernoulli, sampling, packing
@PROP
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 40), st.floats(0.1, 30), st.integers(0, 10_000))
@pytest.mark.unit
def test_bernoulli_logprob_matches_torch(b, g, m, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(b, m, generator=gen, dtype=torch.float64) * scale
    masks = torch.rand(b, g, m, generator=gen) < 0.5
    ref = torch.distributions.Bernoulli(logits=z[:, None, :]).log_prob(masks.double()).sum(-1)
    got = bernoulli_logprob(z[:, None, :], masks)
    assert torch.allclose(got, ref, rtol=1e-9, atol=1e-9)
    ent = torch.distributions.Bernoulli(logits=z).entropy()
    assert torch.allclose(bernoulli_entropy(z), ent, atol=1e-9)


@pytest.mark.unit
def test_logprob_is_finite_for_extreme_logits_and_respects_valid():
    z = torch.tensor([[80.0, -80.0, 0.0]])
    m = torch.tensor([[[False, True, True]]])
    lp = token_logprob(z[:, None], m)
    assert torch.isfinite(lp).all() and lp[0, 0, 0] == pytest.approx(-80.0) and lp[0, 0, 2] == pytest.approx(-math.log(2))
    valid = torch.tensor([[True, True, False]])
    assert bernoulli_logprob(z[:, None], m, valid[:, None]).item() == pytest.approx(-160.0)


@PROP
@given(st.integers(1, 4), st.integers(1, 8), st.integers(1, 30), st.floats(-12, 3), st.integers(0, 10_000))
@pytest.mark.unit
def test_sample_masks_never_empty(b, g, m, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(b, m, generator=gen) + bias
    masks = sample_masks(z, g, torch.Generator().manual_seed(seed))
    assert masks.shape == (b, g, m) and masks.dtype == torch.bool
    assert torch.all(masks.any(-1))
    again = sample_masks(z, g, torch.Generator().manual_seed(seed))
    assert torch.equal(masks, again)  # deterministic for a seeded generator


@pytest.mark.unit
def test_sample_masks_empty_rule_and_rate():
    z = torch.full((2, 6), -40.0)
    z[0, 4] = -30.0  # the argmax of sample 0; sample 1 ties everywhere -> lowest index
    masks = sample_masks(z, 3, torch.Generator().manual_seed(0))
    assert torch.equal(masks.sum(-1), torch.ones(2, 3, dtype=torch.long))
    assert torch.all(masks[0, :, 4]) and torch.all(masks[1, :, 0])
    valid = torch.tensor([[True] * 6, [False, False, True, True, True, True]])
    masks = sample_masks(z, 3, torch.Generator().manual_seed(0), valid)
    assert torch.all(masks[1, :, 2]) and not masks[1, :, :2].any()
    # keep rate follows sigmoid(z), plus the empty-mask mass moved onto the argmax token
    zz = torch.tensor([[-1.0, 0.0, 2.0]])
    rate = sample_masks(zz, 20_000, torch.Generator().manual_seed(1)).float().mean(1)[0]
    p = torch.sigmoid(zz[0])
    expected = p + torch.tensor([0.0, 0.0, 1.0]) * (1 - p).prod()
    assert torch.allclose(rate, expected, atol=0.015)


@PROP
@given(st.integers(1, 3), st.integers(2, 300), st.floats(0.01, 0.99), st.floats(0.1, 20), st.integers(0, 10_000))
@pytest.mark.unit
def test_budget_shift_hits_the_expected_count_and_keeps_the_ranking(b, m, r, scale, seed):
    z = torch.randn(b, m, generator=torch.Generator().manual_seed(seed)) * scale
    kept = torch.full((b,), r * m).clamp(0.5, m - 0.5)
    shift = budget_shift(z, kept)
    p = torch.sigmoid(z.double() + shift.double()[:, None])
    assert torch.allclose(p.sum(-1), kept.double(), atol=1e-3 * m)
    shifted = z.double() + shift.double()[:, None]  # a constant per row: the same order (top-K reads only that)
    assert torch.equal(torch.argsort(shifted, dim=-1, stable=True), torch.argsort(z, dim=-1, stable=True))


@pytest.mark.unit
def test_budget_shift_rejects_bad_budgets():
    with pytest.raises(ValueError, match="0 < kept < M"):
        budget_shift(torch.zeros(1, 4), torch.tensor([4.0]))
    with pytest.raises(ValueError, match="finite"):
        budget_shift(torch.tensor([[0.0, float("nan")]]), torch.tensor([1.0]))


@PROP
@given(st.lists(st.integers(1, 3), min_size=0, max_size=2), st.integers(1, 70), st.integers(0, 10_000))
@pytest.mark.unit
def test_pack_unpack_round_trip(lead, m, seed):
    masks = torch.rand(*lead, m, generator=torch.Generator().manual_seed(seed)) < 0.3
    packed = pack_masks(masks)
    assert packed.bits.dtype == torch.uint8 and packed.bits.shape == (*lead, math.ceil(m / 8))
    assert packed.num_tokens == m
    assert torch.equal(unpack_masks(packed), masks)


# ------------------------------------------------------------------------------ loss
def _loss_case(seed=0, b=2, g=4, m=12):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(b, m, generator=gen, dtype=torch.float64)
    masks = torch.rand(b, g, m, generator=gen) < torch.sigmoid(z)[:, None]
    adv = torch.randn(b, g, generator=gen, dtype=torch.float64)
    return z, masks, adv


@pytest.mark.unit
def test_surrogate_gradient_at_ratio_one_is_reinforce():
    z, masks, adv = _loss_case()
    z1 = z.clone().requires_grad_(True)
    out = clipped_surrogate_loss(z1, masks, z, adv, clip=0.2, entropy_coef=0.0)
    out["loss"].backward()
    z2 = z.clone().requires_grad_(True)
    reinforce = -(adv[..., None] * token_logprob(z2[:, None], masks)).mean()
    reinforce.backward()
    assert torch.allclose(z1.grad, z2.grad, atol=1e-12)
    assert out["clip_frac"] == 0 and out["approx_kl"] == pytest.approx(0, abs=1e-12) and out["ratio"] == pytest.approx(1)


@pytest.mark.unit
def test_clipping_engages_beyond_the_range():
    z = torch.zeros(1, 1, dtype=torch.float64)
    m = torch.ones(1, 1, 1, dtype=torch.bool)  # kept: ratio = p_new / p_old = 2 sigmoid(z)
    for a, new, clipped in [(1.0, 2.0, True), (1.0, -2.0, False), (-1.0, -2.0, True), (-1.0, 2.0, False), (1.0, 0.3, False)]:
        zn = torch.tensor([[new]], dtype=torch.float64, requires_grad=True)
        out = clipped_surrogate_loss(zn, m, z, torch.tensor([[a]], dtype=torch.float64), clip=0.2, entropy_coef=0.0)
        out["loss"].backward()
        r = 2 * torch.sigmoid(torch.tensor(new)).item()
        assert (out["clip_frac"].item() == 1.0) == clipped
        if clipped:  # beyond 1 +- clip in the advantage's direction: flat objective, no gradient
            assert out["pg_loss"].item() == pytest.approx(-a * (1.2 if a > 0 else 0.8))
            assert zn.grad.abs().item() == 0
        else:
            assert out["pg_loss"].item() == pytest.approx(-a * r) and zn.grad.abs().item() > 0


@pytest.mark.unit
def test_entropy_bonus_pushes_toward_half():
    z = torch.tensor([[3.0, -2.0]], requires_grad=True)
    m = torch.ones(1, 2, 2, dtype=torch.bool)
    out = clipped_surrogate_loss(z, m, z.detach(), torch.zeros(1, 2), clip=0.2, entropy_coef=0.5)
    out["loss"].backward()
    assert out["pg_loss"].item() == 0 and out["loss"].item() == pytest.approx(-0.5 * out["entropy"].item())
    assert z.grad[0, 0] > 0 and z.grad[0, 1] < 0  # descent moves both logits toward 0 (max entropy)


@pytest.mark.unit
def test_loss_respects_valid_and_reports_keep_prob():
    z, masks, adv = _loss_case(m=6)
    valid = torch.tensor([[True] * 6, [True, True, True, False, False, False]])
    zz = z.clone()
    zz[1, 3:] = 1e3  # padded garbage must not matter
    a = clipped_surrogate_loss(zz, masks, z, adv, clip=0.2, entropy_coef=0.01, valid=valid)
    z_cut = z.clone()
    ref_keep = (torch.sigmoid(z[0]).sum() + torch.sigmoid(z[1, :3]).sum()) / 9
    assert a["keep_prob"].item() == pytest.approx(ref_keep.item())
    assert torch.isfinite(a["loss"]) and a["pg_loss"].item() == pytest.approx(clipped_surrogate_loss(
        z_cut, masks, z, adv, clip=0.2, entropy_coef=0.0, valid=valid)["pg_loss"].item())


# ------------------------------------------------------------------------------ top-K selection
def _brute_topk(z, k):
    return sorted(sorted(range(len(z)), key=lambda i: (-z[i], i))[:k])


@PROP
@given(st.integers(1, 3), st.integers(1, 5), st.integers(1, 3), st.integers(1, 3), st.floats(0.01, 1.0),
       st.integers(0, 3), st.integers(0, 10_000))
@pytest.mark.unit
def test_topk_exact_sorted_deterministic(b, t, gh, gw, r, mpf, seed):
    n = gh * gw
    m = t * n
    gen = torch.Generator().manual_seed(seed)
    z = torch.randint(-3, 4, (b, m), generator=gen).float()  # many ties on purpose
    keep = topk_keep(z, r, grid=(t, gh, gw), min_per_frame=mpf)
    k = budget(r, m)
    assert keep.shape == (b, k) and keep.dtype == torch.long
    assert torch.equal(keep, topk_keep(z, r, grid=(t, gh, gw), min_per_frame=mpf))
    per = min(mpf, k // t, n)
    for i in range(b):
        row = keep[i].tolist()
        assert row == sorted(set(row))
        counts = torch.bincount(keep[i] // n, minlength=t)
        assert torch.all(counts >= per)
        if per == 0:
            assert row == _brute_topk(z[i].tolist(), k)
        assert torch.equal(topk_keep(z[i], k=k, grid=(t, gh, gw), min_per_frame=mpf), keep[i])


@pytest.mark.unit
def test_topk_per_frame_minimum_and_ties():
    z = torch.tensor([9.0, 8.0, 7.0, 6.0, 0.0, 0.0, 0.0, 0.0, 5.0, 1.0, 1.0, 1.0])  # T=3, N=4
    assert topk_keep(z, k=3).tolist() == [0, 1, 2]
    assert topk_keep(z, k=3, grid=(3, 2, 2), min_per_frame=1).tolist() == [0, 4, 8]  # tie -> lowest
    assert topk_keep(z, k=5, grid=(3, 2, 2), min_per_frame=1).tolist() == [0, 1, 2, 4, 8]
    assert topk_keep(z, k=2, grid=(3, 2, 2), min_per_frame=1).tolist() == [0, 1]  # K < T: global
    assert topk_keep(torch.zeros(10), k=4).tolist() == [0, 1, 2, 3]
    assert topk_keep(z, 0.25).tolist() == [0, 1, 2]
    with pytest.raises(ValueError):
        topk_keep(z, 0.5, k=3)
    with pytest.raises(ValueError, match="grid"):
        topk_keep(z, k=3, min_per_frame=1)
    with pytest.raises(ValueError, match="NaN"):
        topk_keep(torch.tensor([0.0, float("nan")]), k=1)
    with pytest.raises(ValueError, match="NaN"):  # batched: a NaN in any row
        topk_keep(torch.tensor([[0.0, 1.0], [2.0, float("nan")]]), k=1)


# ------------------------------------------------------------------------------ policy network
TINY = dict(hidden=32, layers=2, heads=4)


@pytest.mark.unit
def test_policy_trains_after_inference_mode_selection():
    """The selector runs the policy under inference_mode; the fixed embeddings it caches must stay
    usable by a later training forward (an inference tensor there would break backward)."""
    from pipeline.select import SelectionContext
    from pipeline.select import make_score_selector

    torch.manual_seed(0)
    pol = ScorePolicy(24, PolicyConfig(**TINY))
    X = torch.randn(3, 4, 24)
    keep = make_score_selector(pol)(X, 5, SelectionContext(grid=(3, 2, 2)))
    assert keep.tolist() == sorted(keep.tolist()) and len(keep) == 5 and pol.training
    pol(X, (2, 2)).sum().backward()
    assert pol.w_x.weight.grad is not None


@pytest.mark.parametrize("factorized", [True, False])
@pytest.mark.unit
def test_policy_shapes_for_several_T(factorized):
    torch.manual_seed(0)
    pol = ScorePolicy(24, PolicyConfig(factorized=factorized, **TINY)).eval()
    for t in (1, 3, 7):
        assert pol(torch.randn(2, t, 6, 24), (2, 3)).shape == (2, t * 6)
        assert pol(torch.randn(t, 6, 24), (3, 2)).shape == (t * 6,)
    with pytest.raises(ValueError, match="grid"):
        pol(torch.randn(1, 2, 6, 24), (2, 2))


@pytest.mark.unit
def test_initial_keep_prob_is_sigmoid_of_init_logit():
    pol = ScorePolicy(16, PolicyConfig(init_keep_logit=-1.5, **TINY))
    p = torch.sigmoid(pol(torch.randn(2, 3, 4, 16), (2, 2)))
    assert torch.allclose(p, torch.full_like(p, torch.sigmoid(torch.tensor(-1.5)).item()), atol=1e-6)


@pytest.mark.unit
def test_factorized_and_full_differ_but_both_mix_frames():
    torch.manual_seed(0)
    X = torch.randn(1, 3, 4, 16)
    for fact in (True, False):
        pol = ScorePolicy(16, PolicyConfig(factorized=fact, **TINY)).eval()
        torch.nn.init.normal_(pol.head.weight, std=0.5)
        z = pol(X, (2, 2))
        Y = X.clone()
        Y[0, 0, 1] += 1.0  # frame 0, one token: must influence other frames' tokens
        assert not torch.allclose(pol(Y, (2, 2))[0, 8:], z[0, 8:])


@pytest.mark.unit
def test_frame_mask_ignores_padding():
    torch.manual_seed(0)
    for fact in (True, False):
        pol = ScorePolicy(16, PolicyConfig(factorized=fact, **TINY)).eval()
        torch.nn.init.normal_(pol.head.weight, std=0.5)
        X = torch.randn(1, 3, 4, 16)
        ref = pol(X, (2, 2))
        pad = torch.cat([X, torch.randn(1, 2, 4, 16)], 1)
        fm = torch.tensor([[True, True, True, False, False]])
        assert torch.allclose(pol(pad, (2, 2), fm)[:, :12], ref, atol=1e-5)


@pytest.mark.unit
def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    pol = ScorePolicy(20, PolicyConfig(factorized=False, init_keep_logit=0.5, **TINY)).eval()
    torch.nn.init.normal_(pol.head.weight, std=0.3)
    X = torch.randn(2, 4, 6, 20)
    pol.save_pretrained(tmp_path / "p")
    assert sorted(f.name for f in (tmp_path / "p").iterdir()) == ["config.json", "model.safetensors"]
    back = ScorePolicy.from_pretrained(tmp_path / "p").eval()
    assert back.embed_dim == 20 and back.cfg == pol.cfg
    assert torch.equal(back(X, (2, 3)), pol(X, (2, 3)))


@pytest.mark.unit
def test_surprise_state_and_flops():
    X = torch.ones(1, 3, 2, 4)
    X[0, 2, 1] = 3.0
    R, u = surprise_state(X)
    assert torch.all(R[:, 0] == 0) and torch.allclose(u[0], torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 2 / 3]]), atol=1e-5)
    pol = ScorePolicy(896)  # default config: the real-model budget
    assert 1e6 < pol.num_params() < 3e6
    assert pol.flops(32, 196) < 0.02 * 2 * 0.36e9 * 32 * 196  # < 2% of a 0.5B LLM's prefill
    assert ScorePolicy(896, PolicyConfig(factorized=False)).flops(32, 196) > pol.flops(32, 196)


@pytest.mark.unit
def test_video_scale_is_unit_free_and_ignores_padding():
    torch.manual_seed(0)
    X = torch.nn.functional.normalize(torch.randn(1, 3, 4, 8), dim=-1)  # every token norm 1 ...
    X[0, 1, 2] *= 3.0  # ... but one
    s, m = video_scale(X)
    assert torch.allclose(s, torch.ones(1)) and m.shape == (1, 3, 4) and torch.allclose(m[0, 1, 2], torch.tensor(3.0).log())
    assert m.flatten()[m.flatten() != m[0, 1, 2]].abs().max() < 1e-5
    s7, m7 = video_scale(7.5 * X)  # a brighter world or a wider model: the same cue
    assert torch.allclose(s7, 7.5 * s) and torch.allclose(m7, m, atol=1e-5)
    padded = torch.cat([X, torch.zeros(1, 2, 4, 8)], 1)  # two zero frames: not part of the median, cue 0
    sp, mp = video_scale(padded, torch.tensor([[True] * 3 + [False] * 2]))
    assert torch.allclose(sp, s) and torch.allclose(mp[:, :3], m, atol=1e-6) and torch.all(mp[:, 3:] == 0)
    assert all(t.isfinite().all() for t in video_scale(torch.zeros(1, 2, 2, 4)))  # an all-black video: finite
    # the policy's own scores depend on the video only up to its scale (the per-token LayerNorm's
    # invariance, kept per video): a scaled copy of a video scores the same
    pol = ScorePolicy(8, PolicyConfig(**TINY, video_scale=True))
    torch.nn.init.normal_(pol.head.weight, std=0.5)
    V = torch.randn(2, 6, 8) * torch.rand(2, 6, 1) * 3
    assert torch.allclose(pol(V, (2, 3)), pol(4.0 * V, (2, 3)), atol=1e-4)
    assert not torch.allclose(pol(V, (2, 3)), pol(V * torch.tensor([1.0] * 5 + [4.0])[None, :, None], (2, 3)), atol=1e-3)


@pytest.mark.unit
def test_policy_saved_before_video_scaling_still_loads(tmp_path):
    old = ScorePolicy(8, PolicyConfig(**TINY, video_scale=False))
    old.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    del meta["video_scale"]  # what an older writer left
    (tmp_path / "config.json").write_text(json.dumps(meta))
    back = ScorePolicy.from_pretrained(tmp_path)
    X = torch.randn(2, 6, 8)
    assert not back.cfg.video_scale and torch.equal(back(X, (2, 3)), old(X, (2, 3)))
    new = ScorePolicy(8, PolicyConfig(**TINY, video_scale=True))
    assert new.cfg.video_scale and new.inp.in_features == old.inp.in_features + 1 and not hasattr(new, "ln_x")


@pytest.mark.unit
def test_score_selector_interface():
    torch.manual_seed(0)
    pol = ScorePolicy(8, PolicyConfig(**TINY))
    torch.nn.init.normal_(pol.head.weight, std=0.5)
    sel = make_score_selector(pol, min_per_frame=1)
    X = torch.randn(4, 6, 8)
    idx = sel(X, 8, SelectionContext(grid=(4, 2, 3)))
    assert idx.shape == (8,) and torch.equal(idx, torch.unique(idx))
    assert torch.all(torch.bincount(idx // 6, minlength=4) >= 1) and pol.training


@pytest.mark.unit
def test_config_fields_and_defaults():
    cfg = load_config(None, ["stage.pseudo_video.penalty_scale_by_dce=true", "policy.min_per_frame=2"])
    assert cfg.stage.pseudo_video.penalty_scale_by_dce and cfg.policy.min_per_frame == 2
    # values the algorithms cannot run with are refused up front, with the key named
    # (adv_eps 0: a zero-spread safe group would divide by zero; mlp_ratio 0: no MLP)
    from pipeline.config import ConfigError

    for override, message in (("stage.real_video.adv_eps=0", "config: stage.real_video.adv_eps: Input should be greater than 0"),
                              ("policy.mlp_ratio=0", "config: policy.mlp_ratio: Input should be greater than or equal to 1")):
        with pytest.raises(ConfigError) as e:
            load_config(None, [override])
        assert str(e.value).startswith(message), str(e.value)
    with pytest.raises(ValueError, match="adv_eps"):
        StageConfig(adv_eps=-1e-6)


# ------------------------------------------------------------------------------ end to end (tiny)
@pytest.mark.slow
def test_policy_learns_to_keep_surprising_tokens():
    """Policy + split advantage + loss: a rollout is safe iff it keeps every high-surprise token;
    in 80 on-policy steps the policy keeps those and drops the static background."""
    torch.manual_seed(0)
    t, gh, gw, d = 4, 4, 4, 16
    n = gh * gw
    X = torch.randn(n, d).expand(t, n, d).clone() + 0.01 * torch.randn(t, n, d)
    X[1, 3] += 3 * torch.randn(d)
    X[2, 9] += 3 * torch.randn(d)
    X[3, 14] += 3 * torch.randn(d)
    hot = (surprise_state(X[None])[1][0] > 0.5).reshape(-1)
    assert 3 <= int(hot.sum()) <= 6
    stage = StageConfig(group_size=16, lr=3e-3)  # 1e-2 saturates probabilities before the signal arrives
    pol = ScorePolicy(d, PolicyConfig(hidden=32, layers=1, heads=2))
    opt = torch.optim.Adam(pol.parameters(), lr=stage.lr)
    gen = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a bit-reproducible trajectory whatever the machine's core count
    try:
        for _ in range(80):
            z = pol(X[None], (gh, gw))
            masks = sample_masks(z.detach(), stage.group_size, gen)
            dce = torch.where((masks | ~hot).all(-1), 1.0, -1.0)
            adv = split_advantage(dce, sparsity(masks), stage.penalty, stage.adv_eps, stage.penalty_scale_by_dce)
            out = clipped_surrogate_loss(z, masks, z.detach(), adv, clip=stage.clip, entropy_coef=stage.entropy)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
        with torch.no_grad():
            p = torch.sigmoid(pol(X[None], (gh, gw)))[0]
    finally:
        torch.set_num_threads(threads)
    assert p[hot].min() > 0.9 and p[~hot].max() < 0.3
    keep = topk_keep(p.logit(), k=int(hot.sum()))
    assert torch.equal(keep, torch.nonzero(hot).squeeze(-1))


@pytest.mark.unit
def test_mask_strip_shows_every_token_step_up_to_max_frames():
    """The TensorBoard mask strip has one column per token step (T' < max_frames: all of them)."""
    from pipeline.plots import mask_strip

    import numpy as np

    widths = {T: mask_strip(np.zeros((T, 8, 8, 3), np.uint8), [np.ones((T, 2, 2), bool)], max_frames=8).shape[1]
              for T in (1, 2, 4, 8, 16)}
    col = widths[1] + 2  # one column plus its gap
    assert [widths[T] for T in (2, 4, 8)] == [2 * col - 2, 4 * col - 2, 8 * col - 2] and widths[16] == widths[8]
