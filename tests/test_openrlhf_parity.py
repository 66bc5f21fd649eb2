"""OpenRLHF's PolicyLoss, ValueLoss and aggregate_loss (OpenRLHF/OpenRLHF 3c3be62,
openrlhf/models/loss.py), re-implemented here from their formulas, against policy_loss /
value_loss with ``policy_preset("openrlhf")``: the loss and its gradient to the log-probs."""

from __future__ import annotations

import pytest
import torch
from test_policy_loss import _rollout

from prefkern.losses import policy_loss, policy_preset, rollout_is_weights, value_loss


def _masked_mean(x, mask, dim=None):
    return (x * mask).sum(dim=dim) / mask.sum(dim=dim)


def _aggregate(loss, mask, token_level, dp_size=1, batch_num_tokens=None,
               global_batch_size=None):
    """OpenRLHF aggregate_loss: token mode masked mean (or sum / global tokens * dp);
    sample mode: per-sequence mean (+1e-8), empty sequences excluded."""
    if token_level:
        if batch_num_tokens is None:
            return _masked_mean(loss, mask)
        return (loss * mask).sum() / batch_num_tokens * dp_size
    counts = mask.sum(-1)
    seq = (loss * mask).sum(-1) / (counts + 1e-8)
    seq_mask = (counts > 0).float()
    if global_batch_size is None:
        return _masked_mean(seq, seq_mask)
    return (seq * seq_mask).sum() / global_batch_size * dp_size


def _openrlhf_policy(logp, old, adv, mask, *, kind="ppo", dual_clip=None, rollout=None,
                     is_type="tis", band=(0.5, 5.0), eps=(0.2, 0.2), **agg):
    raw = logp - old
    if kind == "ppo":
        ratio = raw.clamp(-20.0, 20.0).exp()
    else:  # gspo: the sequence's mean log-ratio, gradient through the mean
        ratio = ((raw * mask).sum(-1) / mask.sum(-1).clamp(min=1)).exp().unsqueeze(-1) * mask
    surr1 = ratio * adv
    surr2 = ratio.clamp(1 - eps[0], 1 + eps[1]) * adv
    if dual_clip is None:
        loss = -torch.min(surr1, surr2)
    else:
        clip1 = torch.min(surr1, surr2)
        loss = -torch.where(adv < 0, torch.max(clip1, dual_clip * adv), clip1)
    if rollout is not None and kind == "ppo":
        log_ratio = old - rollout
        w = torch.exp(log_ratio)
        if is_type == "icepop":
            w = w * ((w >= band[0]) & (w <= band[1]))
        elif is_type == "seq-mask-tis":
            seq = torch.exp(_masked_mean(log_ratio, mask, dim=-1))
            w = ((seq >= band[0]) & (seq <= band[1])).unsqueeze(-1) * w
        else:
            w = w.clamp(min=band[0], max=band[1])
        loss = w.detach() * loss
    return _aggregate(loss, mask, token_level=kind == "ppo", **agg)


def _compare(ours_fn, theirs_fn, logp):
    results = []
    for fn, dtype in ((ours_fn, torch.float32), (theirs_fn, torch.float64)):
        x = logp.detach().to(dtype).requires_grad_(True)
        loss = fn(x)
        loss.backward()
        results.append((loss.double(), x.grad.double()))
    (loss, grad), (want, want_grad) = results
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("agg", [{}, {"batch_num_tokens": 301.0, "dp_size": 4}])
def test_ppo(dual_clip, agg):
    logp, old, adv, mask, _, _ = _rollout(spread=0.4)
    m = mask.float()
    normalizer = None if not agg else agg["batch_num_tokens"] / agg["dp_size"]
    kw = policy_preset("openrlhf", dual_clip=dual_clip, eps_high=0.28)
    _compare(lambda x: policy_loss(x, old, adv, mask, normalizer=normalizer, **kw)[0],
             lambda x: _openrlhf_policy(x, old.double(), adv.double(), m.double(),
                                        dual_clip=dual_clip, eps=(0.2, 0.28), **agg), logp)


def test_gspo_sample_level():
    """GSPO forces OpenRLHF's sample mode: empty sequences leave the mean, so the normalizer
    is the count of non-empty sequences."""
    logp, old, adv, mask, _, _ = _rollout(spread=0.4, seq_adv=True)
    m = mask.float()
    kw = policy_preset("openrlhf", loss_type="gspo")
    nonempty = mask.any(-1).sum()
    _compare(lambda x: policy_loss(x, old, adv, mask, normalizer=nonempty, **kw)[0],
             lambda x: _openrlhf_policy(x, old.double(), adv.double()[:, None], m.double(),
                                        kind="gspo"), logp)


@pytest.mark.parametrize("is_type", ["tis", "icepop", "seq-mask-tis"])
def test_vllm_is_correction(is_type):
    logp, old, adv, mask, _, _ = _rollout(spread=0.4)
    mask[1, :4] = True  # OpenRLHF's per-sequence masked mean divides by the count
    m = mask.float()
    rollout = old + 0.15 * torch.randn(old.shape, generator=torch.Generator().manual_seed(3))
    band = (0.97, 1.03) if is_type == "seq-mask-tis" else (0.9, 1.1)
    w = rollout_is_weights(old, rollout, mask, mode=is_type, low=band[0], high=band[1])
    kw = policy_preset("openrlhf")
    _compare(lambda x: policy_loss(x, old, adv, mask, is_weights=w, **kw)[0],
             lambda x: _openrlhf_policy(x, old.double(), adv.double(), m.double(),
                                        rollout=rollout.double(), is_type=is_type, band=band),
             logp)


@pytest.mark.parametrize("clip", [None, 0.5])
@pytest.mark.parametrize("token_level", [True, False])
def test_value_loss(clip, token_level):
    """OpenRLHF ValueLoss: 0.5 * aggregate(max((V_clip - R)^2, (V - R)^2))."""
    gen = torch.Generator().manual_seed(5)
    _, _, _, mask, _, _ = _rollout()
    values = torch.randn(mask.shape, generator=gen)
    old = values + 0.7 * torch.randn(mask.shape, generator=gen)
    returns = torch.randn(mask.shape, generator=gen)
    m = mask.double()
    agg = "token-mean" if token_level else "seq-mean-token-mean"
    normalizer = None if token_level else mask.any(-1).sum()

    def theirs(v):
        o, r = old.double(), returns.double()
        if clip is None:
            loss = (v - r) ** 2
        else:
            v_clip = o + (v - o).clamp(-clip, clip)
            loss = torch.max((v_clip - r) ** 2, (v - r) ** 2)
        return 0.5 * _aggregate(loss, m, token_level)

    _compare(lambda v: value_loss(v, old, returns, mask, clip=clip, agg=agg,
                                  normalizer=normalizer)[0], theirs, values)


# ------------------------------------------------------------------ the adapter module

def test_adapter_policy_and_value_modules():
    from prefkern.integrations import openrlhf as orl

    logp, old, adv, mask, _, _ = _rollout(spread=0.4)
    mask[1, :4] = True
    m = mask.float()
    rollout = old + 0.15 * torch.randn(old.shape, generator=torch.Generator().manual_seed(3))
    module = orl.PolicyLoss(0.2, 0.28, dual_clip=3.0, enable_vllm_is_correction=True,
                            vllm_is_truncated_threshold=[0.9, 1.1],
                            vllm_is_correction_type="icepop")
    _compare(lambda x: module(x, old, adv, m, rollout, dp_size=2, batch_num_tokens=200.0)[0],
             lambda x: _openrlhf_policy(x, old.double(), adv.double(), m.double(),
                                        dual_clip=3.0, rollout=rollout.double(),
                                        is_type="icepop", band=(0.9, 1.1), eps=(0.2, 0.28),
                                        dp_size=2, batch_num_tokens=200.0), logp)
    _, clip_ratio, ppo_kl, vllm_kl = module(logp, old, adv, m, rollout)
    torch.testing.assert_close(ppo_kl, _masked_mean(old - logp, m))
    torch.testing.assert_close(vllm_kl, _masked_mean(rollout - old, m))
    gspo = orl.PolicyLoss(policy_loss_type="gspo")
    _compare(lambda x: gspo(x, old, adv[:, :1].expand_as(adv), m)[0],
             lambda x: _openrlhf_policy(x, old.double(), adv.double()[:, :1], m.double(),
                                        kind="gspo"), logp)
    values = torch.randn(mask.shape)
    loss = orl.ValueLoss(0.5, token_level_loss=False)(values, values + 0.3, values * 0.5, m)
    assert loss.dim() == 0 and loss > 0


def test_adapter_dpo_kl_logprobs_and_gae():
    from prefkern.integrations import openrlhf as orl

    gen = torch.Generator().manual_seed(8)
    c, r, rc, rr = (torch.randn(5, generator=gen) * 10 for _ in range(4))
    for ipo, ls in ((False, 0.1), (True, 0.0)):
        loss, chosen, rejected = orl.DPOLoss(0.2, ls, ipo)(c, r, rc, rr)
        d = (c - r) - (rc - rr)
        want = ((d - 1 / 0.4) ** 2).mean() if ipo else \
            (-torch.nn.functional.logsigmoid(0.2 * d) * (1 - ls)
             - torch.nn.functional.logsigmoid(-0.2 * d) * ls).mean()
        torch.testing.assert_close(loss, want)
        torch.testing.assert_close(chosen, 0.2 * (c - rc))
    x, base = torch.randn(4, 6, generator=gen) * 8, torch.randn(4, 6, generator=gen) * 8
    d = x - base
    for kind, want in (("k1", d), ("k2", d**2 / 2), ("k3", (-d).exp() - 1 + d)):
        torch.testing.assert_close(orl.compute_approx_kl(x, base, kind), want.clamp(-10, 10))
    logits = torch.randn(3, 5, 40, generator=gen) * 3
    labels = torch.randint(0, 40, (3, 5), generator=gen)
    want = (logits / 0.7).log_softmax(-1).gather(-1, labels[..., None])[..., 0]
    kept = logits.clone()
    torch.testing.assert_close(orl.log_probs_from_logits(logits, labels, 0.7), want)
    assert torch.equal(logits, kept)  # not divided in place
    torch.testing.assert_close(orl.compute_entropy(logits),
                               -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1))
    # GAE: OpenRLHF zeroes rewards and values off the mask, then scans every position
    values, rewards = torch.randn(3, 9, generator=gen), torch.randn(3, 9, generator=gen)
    mask = torch.ones(3, 9)
    mask[0, :2] = 0  # left padding
    mask[1, 6:] = 0  # right padding
    v, rw = values * mask, rewards * mask
    last, advs = torch.zeros(3), []
    for t in reversed(range(9)):
        nxt = v[:, t + 1] if t < 8 else torch.zeros(3)
        last = rw[:, t] + 0.9 * nxt - v[:, t] + 0.9 * 0.8 * last
        advs.append(last)
    want_adv = torch.stack(advs[::-1], 1)
    adv, ret = orl.get_advantages_and_returns(values, rewards, mask, 0.9, 0.8)
    torch.testing.assert_close(adv, want_adv)
    torch.testing.assert_close(ret, want_adv + v)
