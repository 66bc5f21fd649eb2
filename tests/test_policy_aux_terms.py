"""The KL and entropy terms of policy_loss aggregated apart from the policy term (``aux_agg``,
``aux_normalizer``): against the float64 reference, on the fused path from hidden states, and
as verl (1dda039 workers/utils/losses.py ppo_loss) and OpenRLHF (3c3be62 ppo_actor.py
training_step) combine them, each re-implemented from its formulas."""

from __future__ import annotations

import pytest
import torch
from compare import assert_rule, leaf
from test_openrlhf_parity import _aggregate, _compare, _openrlhf_policy
from test_policy_loss import _rollout, _verl_agg_loss
from test_verl_adapters import _config, verl_normalizers

from prefkern.integrations import verl as pv
from prefkern.losses import linear_policy_loss, policy_loss, policy_preset
from prefkern.reference import linear_logprobs_ref, policy_loss_ref

CASES = [("ppo", "token-mean", "seq-mean-token-sum", {}),
         ("gspo", None, "token-mean", {}),
         ("sapo", None, "token-mean", {"normalizer": 5.0, "aux_normalizer": 61.0}),
         ("grpo", None, "token-sum", {}),
         ("dr_grpo", None, "seq-mean-token-mean", {"loss_scale_factor": 30.0}),
         ("geo_mean", None, "seq-mean-token-mean", {}),
         ("ppo", "token-mean", "token-mean", {"normalizer": 40.0, "aux_normalizer": 90.0})]
IDS = ["ppo", "gspo", "sapo-global", "grpo", "dr_grpo", "geo_mean", "same-mode-other-norm"]


@pytest.mark.parametrize("loss_type,agg,aux_agg,kw", CASES, ids=IDS)
def test_against_the_reference(loss_type, agg, aux_agg, kw):
    """Loss and d loss / d logp, d loss / d entropy against the fp64 spec; the result differs
    from aggregating every term with the policy's mode."""
    logp, old, adv, mask, ref, entropy = _rollout(seq_adv=loss_type == "geo_mean")
    common = dict(loss_type=loss_type, agg=agg, kl_coef=0.3, entropy_coef=0.05,
                  ref_logprobs=ref, **kw)
    runs = []
    for fn, dtype in ((policy_loss, None), (policy_loss_ref, torch.float64),
                      (policy_loss_ref, None)):
        x, h = leaf(logp, dtype), leaf(entropy, dtype)
        out = fn(x, old.to(dtype or old.dtype), adv, mask, entropy=h, aux_agg=aux_agg, **common)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        runs.append((loss, x.grad, h.grad))
    for name, o, r, b in zip(("loss", "dlogprobs", "dentropy"), *runs, strict=True):
        assert_rule(o, r, b, name, reduction=logp.numel())
    same, _ = policy_loss(logp, old, adv, mask, entropy=entropy,
                          **{**common, "aux_normalizer": None,
                             "normalizer": kw.get("normalizer")})
    assert (runs[0][0] - same).abs() > 1e-4


def test_aux_agg_of_the_policys_mode_changes_nothing():
    logp, old, adv, mask, ref, entropy = _rollout()
    kw = dict(loss_type="grpo", kl_coef=0.2, entropy_coef=0.1, ref_logprobs=ref, entropy=entropy)
    plain, _ = policy_loss(logp, old, adv, mask, **kw)
    same, _ = policy_loss(logp, old, adv, mask, aux_agg="seq-mean-token-mean", **kw)
    torch.testing.assert_close(plain, same)
    with pytest.raises(ValueError, match="agg must be one of"):
        policy_loss(logp, old, adv, mask, aux_agg="token-median", **kw)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("fused", [True, False])
def test_from_hidden_states(backend, fused):
    """linear_policy_loss takes the options on both paths: loss, dhidden and dweight against
    the two-pass fp64 spec."""
    gen = torch.Generator().manual_seed(8)
    b, t, h, v = 3, 10, 16, 60
    hidden = torch.randn(b, t, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * 0.5
    targets = torch.randint(0, v, (b, t), generator=gen)
    targets[0, 6:] = -100
    with torch.no_grad():
        old = linear_logprobs_ref(hidden, weight, targets) + 0.1 * torch.randn(b, t,
                                                                               generator=gen)
    adv = torch.randn(b, generator=gen)
    kw = dict(loss_type="sapo", kl_coef=0.1, entropy_coef=0.05, ref_logprobs=old - 0.2,
              aux_agg="token-mean", aux_normalizer=17.0)
    runs = []
    for fn, dtype in (("ours", None), ("spec", torch.float64), ("spec", None)):
        hh, ww = leaf(hidden, dtype), leaf(weight, dtype)
        if fn == "ours":
            loss, _ = linear_policy_loss(hh, ww, targets, old, adv, fused=fused,
                                         backend=backend, **kw)
        else:
            out = linear_logprobs_ref(hh, ww, targets, return_entropy=True)
            loss = policy_loss_ref(out.logprobs, old, adv, targets != -100,
                                   entropy=out.entropy, **kw)
        loss.backward()
        runs.append((loss, hh.grad, ww.grad))
    for name, o, r, bb in zip(("loss", "dhidden", "dweight"), *runs, strict=True):
        assert_rule(o, r, bb, name, reduction=v * b * t)


@pytest.mark.parametrize("loss_type", ["gspo", "sapo", "vanilla"])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("info", [{}, {"dp_size": 2, "batch_num_tokens": 150.0,
                                       "global_batch_size": 11.0}], ids=["local", "global"])
def test_verl_ppo_loss(loss_type, mode, info):
    """verl's ppo_loss: pg_loss (gspo and sapo aggregate it seq-mean-token-mean) -
    entropy_coeff * agg_loss(entropy, loss_agg_mode) + kl_loss_coef * agg_loss(kl_penalty,
    loss_agg_mode), global batch info on every term."""
    logp, old, adv, mask, ref, entropy = _rollout(seq_adv=True)
    adv_tokens = adv[:, None].expand_as(logp)
    preset = policy_preset("verl", loss_type="ppo" if loss_type == "vanilla" else loss_type,
                           agg=mode, eps_high=0.28)
    norms = verl_normalizers(preset, info)

    def verl(x):
        pg, _ = pv.policy_loss_fn(loss_type)(old.double(), x, adv_tokens.double(), mask, mode,
                                             _config(**info))
        kl = pv.kl_penalty(x, ref.double(), "low_var_kl")
        return (pg - 0.05 * _verl_agg_loss(entropy.double(), mask, mode, **info)
                + 0.1 * _verl_agg_loss(kl, mask, mode, **info))

    _compare(lambda x: policy_loss(x, old, adv, mask, entropy=entropy, entropy_coef=0.05,
                                   kl_coef=0.1, ref_logprobs=ref, **norms, **preset)[0],
             verl, logp)


@pytest.mark.parametrize("info", [{}, {"dp_size": 4, "batch_num_tokens": 301.0,
                                       "global_batch_size": 19.0}], ids=["local", "global"])
def test_openrlhf_training_step(info):
    """OpenRLHF: actor loss (GSPO forces sample mode) + kl_ctl * aggregate_loss(kl) -
    entropy_coef * aggregate_loss(entropy), both in token mode with the same batch info."""
    logp, old, adv, mask, ref, entropy = _rollout(spread=0.4, seq_adv=True)
    m = mask.float()
    preset = policy_preset("openrlhf", loss_type="gspo")
    norms = {}
    if info:
        norms = {"normalizer": info["global_batch_size"] / info["dp_size"],
                 "aux_normalizer": info["batch_num_tokens"] / info["dp_size"]}
    else:
        norms = {"normalizer": mask.any(-1).sum()}

    def openrlhf(x):
        kl = (x - ref.double()).clamp(-10.0, 10.0)  # compute_approx_kl k1, clamped
        return (_openrlhf_policy(x, old.double(), adv.double()[:, None], m.double(),
                                 kind="gspo", **info)
                + 0.1 * _aggregate(kl, m.double(), True, **info)
                - 0.01 * _aggregate(entropy.double(), m.double(), True, **info))

    _compare(lambda x: policy_loss(x, old, adv, mask, entropy=entropy, entropy_coef=0.01,
                                   kl_coef=0.1, ref_logprobs=ref, **norms, **preset)[0],
             openrlhf, logp)
