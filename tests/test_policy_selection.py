"""Clip-Cov / KL-Cov (verl 1dda039), TRL's high-entropy mask and rollout importance weights
(TRL f2cd577, OpenRLHF 3c3be62) against their specs, and the token mask in the losses."""

from __future__ import annotations

import math

import pytest
import torch
from compare import assert_rule, leaf
from test_policy_loss import _rollout

import prefkern
from prefkern.losses import policy_loss
from prefkern.losses.rollout_correction import MODES, rollout_is_weights
from prefkern.losses.token_selection import (
    clip_cov_selection,
    high_entropy_mask,
    kl_cov_selection,
    token_covariance,
)
from prefkern.reference import policy_loss_ref


def _wide_rollout(seed=0):
    """Log-probs and advantages spread enough that many covariances fall in (1, 5)."""
    logp, old, adv, mask, ref, entropy = _rollout(b=8, t=64, seed=seed, spread=0.5)
    return logp * 2.0, old * 2.0, adv * 2.0, mask, ref, entropy


@pytest.mark.parametrize("loss_type,kw", [("clip_cov", {"clip_cov_ratio": 0.02}),
                                          ("clip_cov", {"clip_cov_ratio": 1.0}),
                                          ("kl_cov", {"kl_cov_ratio": 0.05}),
                                          ("kl_cov", {"kl_cov_ratio": 0.01, "ppo_kl_coef": 3.0})])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_cov_losses_against_reference(loss_type, kw, agg):
    logp, old, adv, mask, _, _ = _wide_rollout()
    runs = []
    for fn, dtype in ((policy_loss, None), (policy_loss_ref, torch.float64),
                      (policy_loss_ref, None)):
        x = leaf(logp, dtype)
        gen = torch.Generator().manual_seed(7)  # the same draw for every run
        out = fn(x, old.to(dtype or old.dtype), adv, mask, loss_type=loss_type, agg=agg,
                 generator=gen, **kw)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        runs.append((loss, x.grad))
    # the loss sums O(|A|) terms that may cancel (the reference runs in fp64 whatever the
    # input dtype, so its base error is 0): the floor scales with the terms, not the sum
    scale = adv.abs().max().item()
    for name, o, r, b in zip(("loss", "dlogprobs"), *runs, strict=True):
        assert_rule(o, r, b, name, reduction=logp.numel(), scale=scale if name == "loss" else None)
    plain, _ = policy_loss(logp, old, adv, mask, loss_type="ppo", ratio_log_clamp=None,
                           agg=agg)
    if loss_type == "kl_cov":
        assert not torch.allclose(plain, runs[0][0].detach())


def test_clip_cov_is_verls_with_every_candidate_cut():
    """clip_cov_ratio large enough to cut every candidate: verl's selection is deterministic
    then, transcribed here from its formula (corr = 0 on band tokens the clip left alone)."""
    logp, old, adv, mask, _, _ = _wide_rollout(seed=3)
    x = leaf(logp)
    loss, metrics = policy_loss(x, old, adv, mask, loss_type="clip_cov", clip_cov_ratio=1.0,
                                eps_low=0.2, eps_high=0.28)
    loss.backward()
    y = leaf(logp, torch.float64)
    m = mask.double()
    ratio = torch.exp(y - old.double())
    pg1, pg2 = -adv * ratio, -adv * ratio.clamp(0.8, 1.28)
    clip_by_origin = (pg2 > pg1) & mask
    masked_mean = lambda t: (t * m).sum() / m.sum()  # noqa: E731
    cov = (adv - masked_mean(adv)) * (y.detach() - masked_mean(y.detach()))
    corr = torch.where((cov > 1) & (cov < 5) & mask & ~clip_by_origin, 0.0, 1.0)
    want = (torch.maximum(pg1, pg2) * corr * m).sum() / m.sum()
    want.backward()
    assert (corr[mask] == 0).sum() >= 5, "the case must cut some tokens"
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(x.grad.double(), y.grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(metrics["pg_clipfrac"].double(), masked_mean(1 - corr))


def test_selection_counts_and_candidates():
    logp, _, adv, mask, _, _ = _wide_rollout(seed=1)
    cov = token_covariance(logp, adv, mask)
    n_valid = int(mask.sum())
    cut = clip_cov_selection(logp, adv, mask, ratio=0.01,
                             generator=torch.Generator().manual_seed(0))
    band = mask & (cov > 1) & (cov < 5)
    assert int(cut.sum()) == min(max(int(0.01 * n_valid), 1), int(band.sum()))
    assert not (cut & ~band).any()
    again = clip_cov_selection(logp, adv, mask, ratio=0.01,
                               generator=torch.Generator().manual_seed(0))
    assert torch.equal(cut, again)
    top = kl_cov_selection(logp, adv, mask, ratio=0.05)
    k = max(int(0.05 * n_valid), 1)
    assert int(top.sum()) == k and not (top & ~mask).any()
    assert cov[top].min() >= cov[mask & ~top].max()
    with pytest.raises(ValueError, match="ratio"):
        kl_cov_selection(logp, adv, mask, ratio=0.0)


def test_cov_losses_take_the_two_pass_path_from_hidden_states():
    torch.manual_seed(0)
    hidden = torch.randn(4, 10, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (4, 10))
    old = -torch.rand(4, 10) * 3
    adv = torch.randn(4, 10) * 3
    loss, _ = prefkern.losses.linear_policy_loss(hidden, weight, targets, old, adv,
                                                 loss_type="kl_cov", kl_cov_ratio=0.1,
                                                 backend="torch")
    loss.backward()
    logp = prefkern.linear_logprobs(hidden, weight, targets, backend="torch")
    want, _ = policy_loss(logp, old, adv, targets != -100, loss_type="kl_cov",
                          kl_cov_ratio=0.1)
    torch.testing.assert_close(loss, want)


# ------------------------------------------------------------------- high-entropy mask

def _trl_entropy_mask(entropies, mask, top_quantile):
    """TRL f2cd577 get_high_entropy_mask on one process, from its formula."""
    local = entropies[mask.bool()].float()
    if local.numel() == 0:
        return torch.zeros_like(entropies, dtype=torch.bool)
    threshold = torch.quantile(local, 1 - top_quantile)
    return ((entropies * mask.float()) >= threshold) & mask.bool()


@pytest.mark.parametrize("top_quantile", [0.2, 0.5, 1.0])
def test_high_entropy_mask_is_trls(top_quantile, monkeypatch):
    _, _, _, mask, _, entropy = _rollout(b=6, t=40)
    got = high_entropy_mask(entropy, mask, top_quantile)
    want = _trl_entropy_mask(entropy, mask, top_quantile)
    assert torch.equal(got, want)
    assert abs(got.sum().item() - top_quantile * mask.sum().item()) <= 2
    # past torch.quantile's size limit: the same interpolation from a sort
    from prefkern.losses import token_selection

    monkeypatch.setattr(token_selection, "_QUANTILE_MAX", 8)
    assert torch.equal(high_entropy_mask(entropy, mask, top_quantile), want)


def test_high_entropy_mask_across_a_process_group(tmp_path):
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", rank=0, world_size=1, store=store)
    try:
        _, _, _, mask, _, entropy = _rollout(b=5, t=30, seed=4)
        got = high_entropy_mask(entropy, mask, 0.3, process_group=dist.group.WORLD)
        assert torch.equal(got, _trl_entropy_mask(entropy, mask, 0.3))
    finally:
        dist.destroy_process_group()


def test_token_mask_multiplies_the_surrogate():
    logp, old, adv, mask, ref, entropy = _rollout()
    keep = high_entropy_mask(entropy, mask, 0.5)
    runs = []
    for fn, dtype in ((policy_loss, None), (policy_loss_ref, torch.float64),
                      (policy_loss_ref, None)):
        x = leaf(logp, dtype)
        out = fn(x, old.to(dtype or old.dtype), adv, mask, loss_type="grpo", token_mask=keep,
                 ref_logprobs=ref, kl_coef=0.05)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        runs.append((loss, x.grad))
    for name, o, r, b in zip(("loss", "dlogprobs"), *runs, strict=True):
        assert_rule(o, r, b, name, reduction=logp.numel())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_token_mask_fused_equals_two_pass(backend):
    torch.manual_seed(0)
    hidden = torch.randn(3, 12, 16)
    weight = torch.randn(40, 16)
    targets = torch.randint(0, 40, (3, 12))
    old = -torch.rand(3, 12) * 3
    adv = torch.randn(3)
    keep = torch.rand(3, 12) > 0.4
    grads = []
    for fused in (True, False):
        h, w = leaf(hidden), leaf(weight)
        loss, _ = prefkern.losses.linear_policy_loss(h, w, targets, old, adv, fused=fused,
                                                     loss_type="dapo", token_mask=keep,
                                                     backend=backend)
        loss.backward()
        grads.append((loss, h.grad, w.grad))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)


# ------------------------------------------------------------ rollout importance weights

def _trl_is(old, sampling, mask, mode, clip_min, clip_max):
    """TRL f2cd577 GRPOTrainer's vLLM importance-sampling ratio, from its formula."""
    diff = (old - sampling) * mask
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    lo = clip_min if clip_min is not None else -math.inf
    hi = clip_max if clip_max is not None else math.inf
    return ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)


def _openrlhf_is(old, rollout, mask, kind, low, high):
    """OpenRLHF 3c3be62 PolicyLoss's vllm_is factor, from its formula."""
    log_ratio = old - rollout
    if kind == "icepop":
        w = torch.exp(log_ratio)
        return w * ((w >= low) & (w <= high))
    if kind == "seq-mask-tis":
        seq = torch.exp((log_ratio * mask).sum(-1) / mask.sum(-1))
        return ((seq >= low) & (seq <= high)).unsqueeze(-1) * torch.exp(log_ratio)
    return torch.exp(log_ratio).clamp(min=low, max=high)


@pytest.mark.parametrize("mode", MODES)
def test_rollout_is_weights_are_the_trainers(mode):
    logp, old, _, mask, _, _ = _rollout(b=6, t=30, seed=2, spread=0.15)
    mask[1, :3] = True  # no empty row: OpenRLHF's masked mean divides by the count
    rollout = old + 0.1 * torch.randn(old.shape, generator=torch.Generator().manual_seed(9))
    if mode in ("tis", "icepop", "seq-mask-tis"):
        low, high = (0.99, 1.01) if mode == "seq-mask-tis" else (0.9, 1.1)
        want = _openrlhf_is(old, rollout, mask.float(), mode, low, high)
    else:
        low, high = (0.8, 1.2) if mode.startswith("token") else (None, 1.1)
        want = _trl_is(old, rollout, mask.float(), mode, low, high).expand(old.shape)
    got = rollout_is_weights(old, rollout, mask, mode=mode, low=low, high=high)
    want = torch.where(mask, want, 0)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert 0 < (got[mask] == 0).sum() < mask.sum() or mode.endswith("truncate") or mode == "tis"
    # packed == padded
    lengths = mask.sum(-1)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    packed = rollout_is_weights(old[mask], rollout[mask], torch.ones(int(lengths.sum()),
                                                                     dtype=torch.bool),
                                mode=mode, low=low, high=high, cu_seqlens=cu)
    torch.testing.assert_close(packed, got[mask])


def test_rollout_is_weights_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="mode"):
        rollout_is_weights(x, x, x.bool(), mode="nope")
    with pytest.raises(ValueError, match="low and high"):
        rollout_is_weights(x, x, x.bool(), mode="icepop", low=None, high=2.0)


def test_rollout_is_weights_treat_missing_rollout_logprobs_as_ratio_one():
    """TRL 1.16 maps a NaN log-prob difference to 0 (nan_to_num): ratio 1, never a NaN loss."""
    old = torch.zeros(2, 4)
    rollout = torch.tensor([[0.0, float("nan"), 0.1, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.ones(2, 4, dtype=torch.bool)
    for mode in ("token_truncate", "tis", "sequence_mask"):
        w = rollout_is_weights(old, rollout, mask, mode=mode, low=0.5, high=2.0)
        assert torch.isfinite(w).all(), mode
    w = rollout_is_weights(old, rollout, mask, mode="token_truncate", low=0.5, high=2.0)
    assert w[0, 1] == 1.0


def test_selection_counts_round_as_verl():
    """verl counts max(int(ratio * n), 1) in Python floats: 0.7 * 90 = 62.99999999999999 -> 62
    (fp32 arithmetic would round it to 63)."""
    gen = torch.Generator().manual_seed(0)
    logp, adv = torch.randn(1, 90, generator=gen), torch.randn(1, 90, generator=gen)
    mask = torch.ones(1, 90, dtype=torch.bool)
    assert int(kl_cov_selection(logp, adv, mask, ratio=0.7).sum()) == int(0.7 * 90) == 62
