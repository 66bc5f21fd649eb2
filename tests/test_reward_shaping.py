"""KL-in-reward and PPO-max running-moments normalization against prefkern.reference.

KL-in-reward mirrors OpenRLHF's compute_reward (openrlhf/models/utils.py, OpenRLHF 02a26057:
outcome score on the last valid token) and verl's token_level_scores - beta * kl; the running
moments mirror TRL / MOSS-RLHF's RunningMoments (PPO-max: update, normalize, clip).
"""

from __future__ import annotations

import pytest
import torch
from compare import assert_rule

from prefkern.ops.reward_shaping import RunningMoments, kl_penalized_rewards, normalize_rewards
from prefkern.reference.advantages import kl_penalized_rewards_ref, normalize_rewards_ref


def _logprob_batch(n, seq_len, dtype=torch.float32):
    logp = -torch.rand(n, seq_len) * 3
    ref = logp + 0.3 * torch.randn(n, seq_len)
    mask = torch.rand(n, seq_len) > 0.25
    mask[1] = False  # a sequence without response tokens
    mask[2, -1] = True  # EOS on the last column
    return logp.to(dtype), ref.to(dtype), mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("score_clip", [None, (-1.0, 2.0)])
def test_kl_rewards_padded(dtype, score_clip):
    logp, ref_logp, mask = _logprob_batch(5, 11, dtype)
    scores = (torch.randn(5) * 4).to(dtype)
    kw = {"kl_coef": 0.05, "score_clip": score_clip}
    out = kl_penalized_rewards(scores, logp, ref_logp, mask, **kw)
    ref = kl_penalized_rewards_ref(scores.double(), logp.double(), ref_logp.double(), mask, **kw)
    base = kl_penalized_rewards_ref(scores.float(), logp.float(), ref_logp.float(), mask, **kw)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_rule(out, ref, base, "rewards")


def test_kl_rewards_packed_and_token_level():
    lengths = torch.tensor([3, 0, 5, 1, 4])
    cu = torch.zeros(6, dtype=torch.int64)
    cu[1:] = lengths.cumsum(0)
    n_tok = int(cu[-1])
    logp, ref_logp = -torch.rand(n_tok), -torch.rand(n_tok)
    mask = torch.rand(n_tok) > 0.3
    scores = torch.randn(5)
    out = kl_penalized_rewards(scores, logp, ref_logp, mask, kl_coef=0.2, cu_seqlens=cu)
    ref = kl_penalized_rewards_ref(scores.double(), logp.double(), ref_logp.double(), mask,
                                   kl_coef=0.2, cu_seqlens=cu)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    token_scores = torch.randn(n_tok)
    out = kl_penalized_rewards(token_scores, logp, ref_logp, mask, kl_coef=0.2, cu_seqlens=cu)
    expected = token_scores - 0.2 * (logp - ref_logp) * mask
    torch.testing.assert_close(out, expected)


def test_kl_rewards_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -0.5, -9.0]])
    ref_logp = torch.tensor([[-1.5, -1.0, -0.5, -1.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    out = kl_penalized_rewards(torch.tensor([3.0]), logp, ref_logp, mask, kl_coef=0.1)
    torch.testing.assert_close(out, torch.tensor([[-0.05, 0.1, 3.0, 0.0]]))


def _openrlhf_compute_reward(r, kl_coef, logp, ref_logp, action_mask, estimator):
    """OpenRLHF 3c3be62 openrlhf/models/utils.py compute_approx_kl + compute_reward, from
    their formulas: every estimator clamped to +-10, the score on the last response token.
    (OpenRLHF leaves -kl_coef * kl outside the mask; its GAE masks it, prefkern zeros it.)"""
    log_ratio = logp.float() - ref_logp.float()
    if estimator == "k2":
        log_ratio = log_ratio**2 / 2.0
    elif estimator == "k3":
        log_ratio = (-log_ratio).exp() - 1 + log_ratio
    kl = log_ratio.clamp(min=-10, max=10)
    eos = action_mask.size(1) - 1 - action_mask.long().fliplr().argmax(dim=1, keepdim=True)
    last = torch.zeros_like(kl).scatter_(1, eos, r.unsqueeze(1).to(kl.dtype))
    return (last - kl_coef * kl) * action_mask


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_rewards_are_openrlhfs(estimator):
    """With OpenRLHF's estimator and its +-10 clamp, on log-ratios up to ~+-14 (where the clamp
    and k3's exponent matter)."""
    gen = torch.Generator().manual_seed(2)
    logp = -torch.rand(4, 9, generator=gen) * 3
    ref_logp = logp + 6.0 * torch.randn(4, 9, generator=gen)
    ref_logp[1, 3], ref_logp[2, 5] = logp[1, 3] + 14.0, logp[2, 5] - 13.0
    mask = torch.ones(4, 9, dtype=torch.bool)
    mask[0, 6:] = False
    mask[3, :2] = False
    scores = torch.randn(4, generator=gen)
    got = kl_penalized_rewards(scores, logp, ref_logp, mask, kl_coef=0.05, kl_kind=estimator,
                               kl_output_clamp=10.0)
    want = _openrlhf_compute_reward(scores, 0.05, logp, ref_logp, mask.float(), estimator)
    torch.testing.assert_close(got, want)
    ref = kl_penalized_rewards_ref(scores, logp, ref_logp, mask, kl_coef=0.05,
                                   kl_kind=estimator, kl_output_clamp=10.0)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    if estimator != "k2":
        plain = kl_penalized_rewards(scores, logp, ref_logp, mask, kl_coef=0.05,
                                     kl_kind=estimator)
        assert not torch.allclose(plain, want)  # the clamp matters on these inputs


def test_kl_rewards_validation():
    logp = torch.randn(2, 4)
    with pytest.raises(ValueError, match="ref_logprobs shape"):
        kl_penalized_rewards(torch.zeros(2), logp, torch.randn(2, 3), kl_coef=0.1)
    with pytest.raises(ValueError, match="outcome scores"):
        kl_penalized_rewards(torch.zeros(3), logp, logp, kl_coef=0.1)
    with pytest.raises(ValueError, match="mask shape"):
        kl_penalized_rewards(torch.zeros(2), logp, logp, torch.ones(2, 3), kl_coef=0.1)


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("clip", [None, 1.5])
def test_running_normalization_matches_reference(center, clip):
    moments = RunningMoments()
    history = []
    for size in (1, 7, 3, 64):
        batch = torch.randn(size) * 3 + 10
        history.append(batch)
        out = normalize_rewards(batch, moments, center=center, clip=clip)
        ref = normalize_rewards_ref(history, center=center, clip=clip)
        torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
        seen = torch.cat(history).double()
        assert int(moments.count) == seen.numel()
        torch.testing.assert_close(moments.mean, seen.mean())
        expected_std = seen.std() if seen.numel() > 1 else torch.tensor(1.0, dtype=torch.float64)
        torch.testing.assert_close(moments.std, expected_std)


def test_running_normalization_mask_and_state():
    moments = RunningMoments()
    rewards = torch.randn(4, 6)
    mask = torch.rand(4, 6) > 0.4
    out = normalize_rewards(rewards, moments, mask=mask)
    assert (out[~mask] == 0).all()
    selected = rewards[mask].double()
    torch.testing.assert_close(moments.mean, selected.mean())
    torch.testing.assert_close(moments.std, selected.std())
    restored = RunningMoments()
    restored.load_state_dict(moments.state_dict())
    torch.testing.assert_close(normalize_rewards(rewards, restored, update=False),
                               normalize_rewards(rewards, moments, update=False))
    with pytest.raises(ValueError, match="seen no values"):
        normalize_rewards(rewards, RunningMoments(), update=False)


@pytest.mark.gpu
def test_gpu_no_host_sync():
    logp = -torch.rand(64, 512, device="cuda")
    ref_logp = logp + 0.1 * torch.randn_like(logp)
    mask = torch.rand(64, 512, device="cuda") > 0.2
    scores = torch.randn(64, device="cuda")
    moments = RunningMoments()
    normalize_rewards(scores, moments)  # warm up (allocates the state)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rewards = kl_penalized_rewards(normalize_rewards(scores, moments, clip=5.0), logp,
                                       ref_logp, mask, kl_coef=0.05)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = kl_penalized_rewards_ref(normalize_rewards(scores, moments, update=False,
                                                          clip=5.0).double().cpu(),
                                        logp.double().cpu(), ref_logp.double().cpu(),
                                        mask.cpu(), kl_coef=0.05)
    torch.testing.assert_close(rewards.double().cpu(), expected, rtol=1e-5, atol=1e-5)
