"""Policy-gradient and value losses against their float64 references (transcribed from verl
1dda039 core_algos and TRL f2cd577 GRPOTrainer): the loss and its gradient to the log-probs
(and the value loss's to the values), every surrogate, form and aggregation."""

from __future__ import annotations

import pytest
import torch
from compare import assert_rule, leaf, noisiest, platform_round

import prefkern
from prefkern.losses import aggregate, policy_loss, value_loss
from prefkern.losses.policy import AGGREGATIONS
from prefkern.reference import agg_loss_ref, policy_loss_ref, value_loss_ref


def _rollout(b=6, t=24, seed=0, spread=0.3, seq_adv=False):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=gen) * 4
    logp = old + spread * torch.randn(b, t, generator=gen)
    ref = old + 0.2 * torch.randn(b, t, generator=gen)
    lengths = torch.randint(1, t + 1, (b,), generator=gen)
    lengths[1] = 0  # an all-masked row
    mask = torch.arange(t)[None] < lengths[:, None]
    adv = torch.randn(b, generator=gen) if seq_adv else torch.randn(b, t, generator=gen)
    entropy = torch.rand(b, t, generator=gen) * 3
    return logp, old, adv, mask, ref, entropy


def _check(mask, *inputs, **kw):
    logp, old, adv, ref, entropy = inputs
    runs = []
    for fn, dtype in ((policy_loss, None), (policy_loss_ref, torch.float64),
                      (policy_loss_ref, None)):
        x = leaf(logp, dtype)
        out = fn(x, old.to(dtype or old.dtype), adv, mask, ref_logprobs=ref, entropy=entropy,
                 **kw)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        runs.append((loss, x.grad))
    for name, o, r, b in zip(("loss", "dlogprobs"), *runs, strict=True):
        assert_rule(o, r, b, name, reduction=logp.numel())
    assert (runs[0][1][~mask] == 0).all()
    return runs[0]


SURROGATES = [("ppo", {}), ("ppo", {"dual_clip": 3.0}), ("ppo", {"delta": 1.1}),
              ("grpo", {"ratio_log_clamp": None}), ("bnpo", {}), ("dapo", {"normalizer": 97.0}),
              ("dr_grpo", {"loss_scale_factor": 32.0}), ("gspo", {"gspo_form": "verl"}),
              ("gspo", {"gspo_form": "trl"}), ("cispo", {"cispo_form": "verl"}),
              ("cispo", {"cispo_form": "trl", "eps_high": 5.0}), ("sapo", {}), ("gpg", {})]
IDS = ["ppo", "ppo-dual", "ppo-delta", "grpo", "bnpo", "dapo", "dr_grpo", "gspo-verl",
       "gspo-trl", "cispo-verl", "cispo-trl", "sapo", "gpg"]


@pytest.mark.parametrize("loss_type,kw", SURROGATES, ids=IDS)
@pytest.mark.parametrize("seq_adv", [False, True], ids=["token-adv", "seq-adv"])
def test_surrogates(loss_type, kw, seq_adv):
    logp, old, adv, mask, ref, entropy = _rollout(seq_adv=seq_adv)
    _check(mask, logp, old, adv, ref, entropy, loss_type=loss_type,
           **{"eps_high": 0.28, **kw})


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_aggregations_kl_entropy_is_weights(agg):
    logp, old, adv, mask, ref, entropy = _rollout(seed=1, spread=1.5)
    is_w = torch.rand(6, 24) * 2
    _check(mask, logp, old, adv, ref, entropy, agg=agg, kl_coef=0.05, entropy_coef=0.01,
           is_weights=is_w, dual_clip=3.0)
    _check(mask, logp, old, adv, ref, entropy, agg=agg, kl_coef=0.1, kl_kind="k3",
           kl_input_clamp=None, kl_output_clamp=None, is_weights=is_w[:, 0])
    # TRL's use_bias_correction_kl: the KL times the raw ratio, gradient through both
    _check(mask, logp, old, adv, ref, entropy, agg=agg, kl_coef=0.1, kl_kind="k3",
           kl_input_clamp=None, kl_output_clamp=None, kl_ratio_weighted=True,
           ratio_log_clamp=None)


def test_sequence_advantages_equal_broadcast_token_advantages():
    logp, old, adv, mask, ref, entropy = _rollout(seq_adv=True)
    a, _ = policy_loss(logp, old, adv, mask, loss_type="grpo")
    b, _ = policy_loss(logp, old, adv[:, None].expand(-1, 24), mask, loss_type="grpo")
    torch.testing.assert_close(a, b)


def test_trl_normalizers():
    """dr_grpo: sum / (B * max_completion_length); dapo: sum / num_items_in_batch; grpo: the
    mean over sequences of each sequence's token mean (TRL f2cd577 _compute_loss)."""
    logp, old, adv, mask, _, _ = _rollout(seed=2)
    per_token, _ = policy_loss(logp, old, adv, mask, loss_type="ppo", agg="token-sum",
                               ratio_log_clamp=None)
    coef = torch.exp(logp - old)
    surrogate = -torch.minimum(coef * adv, coef.clamp(0.8, 1.2) * adv)
    masked = torch.where(mask, surrogate, 0)
    torch.testing.assert_close(per_token, masked.sum())
    dr, _ = policy_loss(logp, old, adv, mask, loss_type="dr_grpo", loss_scale_factor=40,
                        ratio_log_clamp=None)
    torch.testing.assert_close(dr, masked.sum() / (6 * 40))
    dapo, _ = policy_loss(logp, old, adv, mask, loss_type="dapo", normalizer=123.0,
                          ratio_log_clamp=None)
    torch.testing.assert_close(dapo, masked.sum() / 123.0)
    grpo, _ = policy_loss(logp, old, adv, mask, loss_type="grpo", ratio_log_clamp=None)
    want = (masked.sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    torch.testing.assert_close(grpo, want)


def test_metrics():
    logp, old, adv, mask, _, entropy = _rollout(seed=3, spread=2.0)
    _, m = policy_loss(logp, old, adv, mask, dual_clip=3.0, entropy=entropy)
    assert 0 < m["pg_clipfrac"] < 1 and 0 <= m["pg_clipfrac_lower"] < 1
    torch.testing.assert_close(m["approx_kl"], torch.where(mask, old - logp, 0).sum()
                               / mask.sum())
    assert not any(v.requires_grad for v in m.values())


@pytest.mark.parametrize("clip", [0.2, None])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_value_loss(clip, agg):
    gen = torch.Generator().manual_seed(4)
    values, old, ret = (torch.randn(5, 16, generator=gen) for _ in range(3))
    mask = torch.rand(5, 16, generator=gen) < 0.7
    runs = []
    for fn, dtype in ((value_loss, None), (value_loss_ref, torch.float64),
                      (value_loss_ref, None)):
        v = leaf(values, dtype)
        out = fn(v, old, ret, mask, clip=clip, agg=agg)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        runs.append((loss, v.grad))
    for name, o, r, b in zip(("loss", "dvalues"), *runs, strict=True):
        assert_rule(o, r, b, name, reduction=80)


def _verl_agg_loss(loss_mat, loss_mask, mode, dp_size=1, batch_num_tokens=None,
                   global_batch_size=None, loss_scale_factor=None):
    """verl-project/verl 1dda039 core_algos.agg_loss, from its formula: without global
    totals the seq-mean modes divide by the sequences that have a valid token."""
    m = loss_mask.float()
    if mode == "token-mean":
        tokens = m.sum() if batch_num_tokens is None else batch_num_tokens
        return (loss_mat * m).sum() / tokens * dp_size
    if mode == "token-sum":
        return (loss_mat * m).sum() * dp_size
    counts = m.sum(-1)
    seq = (loss_mat * m).sum(-1)
    if mode == "seq-mean-token-mean":
        seq = seq / (counts + 1e-8)
    seq_mask = (counts > 0).float()
    total = seq_mask.sum() if global_batch_size is None else global_batch_size
    out = (seq * seq_mask).sum() / total * dp_size
    if mode == "seq-mean-token-sum-norm":
        out = out / (m.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return out


@pytest.mark.parametrize("norm", [None, 7.0])
def test_aggregate_is_verls_agg_loss(norm):
    gen = torch.Generator().manual_seed(5)
    loss_mat = torch.randn(5, 10, generator=gen)
    mask = torch.rand(5, 10, generator=gen) < 0.6
    mask[2] = False  # a fully masked sequence: verl leaves it out of the sequence count
    for agg in AGGREGATIONS:
        # verl's global totals over dp ranks = prefkern's normalizer (verl needs them at dp > 1)
        dp = 1 if norm is None else 2
        want = _verl_agg_loss(loss_mat, mask, agg, dp_size=dp,
                              batch_num_tokens=None if norm is None else dp * norm,
                              global_batch_size=None if norm is None else dp * norm,
                              loss_scale_factor=12.0)
        got = aggregate(loss_mat, mask, agg, norm, 12.0, seq_count="nonempty")
        # verl's token-sum counters DDP's gradient averaging with a dp factor of its own
        torch.testing.assert_close(got * (dp if agg == "token-sum" else 1), want)
        torch.testing.assert_close(got, agg_loss_ref(loss_mat, mask, agg, norm, 12.0,
                                                     "nonempty").float())
    # TRL's grpo divides by every sequence: ((L * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    trl = ((loss_mat * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    torch.testing.assert_close(aggregate(loss_mat, mask, "seq-mean-token-mean"), trl)


def test_errors():
    logp, old, adv, mask, _, _ = _rollout()
    with pytest.raises(ValueError, match="loss_type must be one of"):
        policy_loss(logp, old, adv, mask, loss_type="ppo2")
    with pytest.raises(ValueError, match="agg must be one of"):
        policy_loss(logp, old, adv, mask, agg="mean")
    with pytest.raises(ValueError, match="advantages must be"):
        policy_loss(logp, old, adv[:, :3], mask)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_policy_loss(backend):
    """From hidden states: loss and dhidden/dweight against the materialized computation, with
    the entropy bonus and a KL term (GRPO with DAPO's token mean)."""
    import prefkern
    from prefkern.reference import linear_logprobs_ref

    gen = torch.Generator().manual_seed(6)
    b, t, h, v = 4, 16, 24, 100
    hidden = torch.randn(b, t, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * 0.6
    targets = torch.randint(0, v, (b, t), generator=gen)
    targets[:, 12:] = -100
    with torch.no_grad():
        old = linear_logprobs_ref(hidden, weight, targets) + 0.1 * torch.randn(b, t,
                                                                               generator=gen)
    ref = old + 0.05
    adv = torch.randn(b, generator=gen)
    kw = dict(loss_type="dapo", kl_coef=0.04, entropy_coef=0.01, ref_logprobs=ref)
    module = prefkern.nn.LinearPolicyLoss(backend=backend, **kw)
    runs = []
    for fn, dtype in (("ours", None), ("spec", torch.float64), ("spec", None)):
        hh, ww = leaf(hidden, dtype), leaf(weight, dtype)
        if fn == "ours":
            loss, _ = module(hh, ww, targets, old, adv)
        else:
            out = linear_logprobs_ref(hh, ww, targets, return_entropy=True)
            loss = policy_loss_ref(out.logprobs, old, adv, targets != -100, entropy=out.entropy,
                                   **kw)
        loss.backward()
        runs.append((loss, hh.grad, ww.grad))
    for name, o, r, bb in zip(("loss", "dhidden", "dweight"), *runs, strict=True):
        assert_rule(o, r, bb, name, reduction=v * b * t)


def _linear_rollout(dtype=torch.float32, seed=7, b=4, t=16, h=24, v=100):
    from prefkern.reference import linear_logprobs_ref

    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=gen).to(dtype)
    weight = (torch.randn(v, h, generator=gen) * 0.6).to(dtype)
    targets = torch.randint(0, v, (b, t), generator=gen)
    targets[:, 11:] = -100
    targets[2] = -100  # an all-masked row
    with torch.no_grad():
        old = linear_logprobs_ref(hidden, weight, targets) + 0.2 * torch.randn(b, t,
                                                                               generator=gen)
    return hidden, weight, targets, old, torch.randn(b, t, generator=gen)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("loss_type,kw", [
    ("ppo", {"dual_clip": 3.0, "kl_coef": 0.1}), ("grpo", {"entropy_coef": 0.02}),
    ("dr_grpo", {"loss_scale_factor": 20.0}), ("cispo", {"cispo_form": "trl", "eps_high": 5.0}),
    ("sapo", {}), ("gpg", {"is_weights": "seq"}), ("gspo", {}), ("geo_mean", {})],
    ids=["ppo", "grpo", "dr_grpo", "cispo", "sapo", "gpg", "gspo-two-pass",
         "geo_mean-two-pass"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_equals_two_pass(backend, loss_type, kw, dtype):
    """The gradient-in-forward path gives the two-pass path's loss, metrics and gradients
    (comparison rule against the fp64 two-pass spec), with a softcap and per-row T."""
    from prefkern.reference import linear_logprobs_ref

    hidden, weight, targets, old, adv = _linear_rollout(dtype)
    kw = dict(kw)
    if kw.get("is_weights") == "seq":
        kw["is_weights"] = torch.rand(4) + 0.5
    if kw.get("kl_coef"):
        kw["ref_logprobs"] = old - 0.1
    temperature = torch.rand(4, 16) + 0.5
    runs, metrics = [], []
    # the last run: the contract's gradients on bf16 inputs (fp32 leaves, d-logits rounded
    # once as the platform rounds: the Triton interpreter truncates)
    contract = [("contract", torch.float32)] if dtype == torch.bfloat16 else []
    for fn, dt in [("fused", None), ("spec", torch.float64), ("spec", None)] + contract:
        hh, ww = leaf(hidden, dt), leaf(weight, dt)
        if fn == "fused":
            loss, m = prefkern.losses.linear_policy_loss(
                hh, ww, targets, old, adv, loss_type=loss_type, temperature=temperature,
                softcap=8.0, backend=backend, **kw)
            metrics.append(m)
        else:
            rounding = (lambda g: platform_round(g, dtype, backend).float()) \
                if fn == "contract" else None
            out = linear_logprobs_ref(hh, ww, targets, temperature=temperature, softcap=8.0,
                                      return_entropy=True, dlogits_dtype=rounding)
            loss = policy_loss_ref(out.logprobs, old, adv, targets != -100,
                                   loss_type=loss_type, entropy=out.entropy, **kw)
        loss.backward()
        runs.append((loss, hh.grad, ww.grad))
    bases = [noisiest(r, *cands) for r, *cands in zip(runs[1], *runs[2:], strict=True)]
    for name, o, r, b in zip(("loss", "dhidden", "dweight"), runs[0], runs[1], bases,
                             strict=True):
        assert_rule(o, r, b, name, reduction=100 * 64)
    assert "approx_kl" in metrics[0] and "entropy" in metrics[0]


@pytest.mark.parametrize("fused", [True, False])
def test_on_policy_old_logprobs_none(fused):
    """old_logprobs=None is the pass's own detached log-probs (TRL without an old-policy pass):
    the same loss and gradients as passing them, and return_per_token gives them back."""
    from prefkern.reference import linear_logprobs_ref

    hidden, weight, targets, _, adv = _linear_rollout()
    with torch.no_grad():
        own = linear_logprobs_ref(hidden, weight, targets, temperature=0.8)
    runs = []
    for old in (None, own):
        hh, ww = leaf(hidden), leaf(weight)
        loss, metrics = prefkern.losses.linear_policy_loss(
            hh, ww, targets, old, adv, loss_type="dapo", temperature=0.8, kl_coef=0.1,
            ref_logprobs=own - 0.3, fused=fused, return_per_token=True, backend="torch")
        loss.backward()
        runs.append((loss, hh.grad, ww.grad, metrics))
    (loss, dh, dw, metrics), (want, want_dh, want_dw, _) = runs
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dh, want_dh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dw, want_dw, rtol=1e-4, atol=1e-6)
    assert metrics["logprobs"].shape == targets.shape and not metrics["logprobs"].requires_grad
    torch.testing.assert_close(metrics["logprobs"], own, rtol=1e-5, atol=1e-5)
    assert metrics["entropy"].shape == targets.shape


def test_fused_backward_runs_no_gemm(monkeypatch):
    from prefkern.ops import gemm

    hidden, weight, targets, old, adv = _linear_rollout()
    hh, ww = leaf(hidden), leaf(weight)
    loss, _ = prefkern.losses.linear_policy_loss(hh, ww, targets, old, adv, loss_type="grpo",
                                                 backend="torch")

    def no_gemm(*args, **kwargs):
        raise AssertionError("a GEMM ran in the backward")

    for target, name in ((gemm, "fp32_mm"), (gemm, "accumulate_mm"), (torch, "mm"),
                         (torch, "matmul")):
        monkeypatch.setattr(target, name, no_gemm)
    (2 * loss).backward()
    monkeypatch.undo()
    h2, w2 = leaf(hidden), leaf(weight)
    loss2, _ = prefkern.losses.linear_policy_loss(h2, w2, targets, old, adv, loss_type="grpo",
                                                  fused=False, backend="torch")
    (2 * loss2).backward()
    torch.testing.assert_close(hh.grad, h2.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ww.grad, w2.grad, rtol=1e-5, atol=1e-7)


def test_trainer_presets():
    """The presets reproduce each trainer's clamps: a log-ratio of 30 is clamped to 20 by verl
    and OpenRLHF, not by TRL; OpenRLHF's dual clip form equals verl's; OpenRLHF's KL is k1
    clamped to +-10."""
    from prefkern.losses import policy_preset

    logp = torch.tensor([[30.0, 0.1, -0.2]])
    old = torch.zeros(1, 3)
    adv = torch.tensor([[-1.0, 0.5, -2.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    ref = torch.tensor([[-20.0, 0.0, 0.0]])
    verl, _ = policy_loss(logp, old, adv, mask, **policy_preset("verl"))
    want = torch.stack([torch.minimum(torch.maximum(-a * torch.exp(torch.clamp(x, -20, 20)),
                                                    -a * torch.exp(torch.clamp(x, -20, 20))
                                                    .clamp(0.8, 1.2)), -a * 3.0)
                        if a < 0 else torch.maximum(-a * torch.exp(x), -a * torch.exp(x)
                                                    .clamp(0.8, 1.2))
                        for x, a in zip(logp[0], adv[0], strict=True)]).mean()
    torch.testing.assert_close(verl, want)
    trl, _ = policy_loss(logp, old, adv, mask, **policy_preset("trl", loss_type="bnpo"))
    assert trl > 1e12  # exp(30) unclamped, A < 0
    orl, m = policy_loss(logp, old, adv, mask, ref_logprobs=ref, kl_coef=1.0,
                         **policy_preset("openrlhf"))
    assert m["kl"] == torch.clamp(logp - ref, -10, 10).mean()
    with pytest.raises(ValueError, match="trainer must be one of"):
        policy_preset("deepspeed")


def test_verl_preset_follows_each_verl_loss():
    """verl's gspo has no dual clip (compute_policy_loss_gspo), and kl_penalty_forward clamps
    only low_var_kl's value: k1 of a log-ratio of 29 stays 29."""
    from prefkern.losses import policy_preset

    assert policy_preset("verl")["dual_clip"] == 3.0
    assert policy_preset("verl", loss_type="gspo")["dual_clip"] is None
    assert policy_preset("verl", loss_type="gspo", dual_clip=2.0)["dual_clip"] == 2.0
    logp, zero = torch.tensor([[29.0, 0.0]]), torch.zeros(1, 2)
    mask = torch.ones(1, 2, dtype=torch.bool)
    for kind, want in (("k1", 14.5), ("abs", 14.5), ("k3", 5.0)):
        _, m = policy_loss(logp, zero, zero, mask, ref_logprobs=zero, kl_coef=1.0,
                           **policy_preset("verl", kl_kind=kind))
        assert m["kl"] == pytest.approx(want), kind


def test_trl_sequence_level_kl_takes_the_sequence_ratio():
    """TRL importance_sampling_level="sequence" with use_bias_correction_kl: per_token_kl *
    coef_1, the (B, 1) sequence ratio (huggingface/trl f2cd577 grpo_trainer.py, written out
    here), loss and gradient."""
    logp, old, adv, mask, ref, _ = _rollout(seq_adv=True)
    m = mask.float()
    runs = []
    for fn in ("ours", "trl"):
        x = logp.clone().requires_grad_(True)
        if fn == "ours":
            loss, _ = policy_loss(x, old, adv, mask, loss_type="gspo", gspo_form="trl",
                                  agg="seq-mean-token-mean", ratio_log_clamp=None,
                                  ref_logprobs=ref, kl_coef=0.1, kl_kind="k3",
                                  kl_input_clamp=None, kl_output_clamp=None,
                                  kl_ratio_weighted=True)
        else:
            coef_1 = torch.exp(((x - old) * m).sum(-1, keepdim=True)
                               / m.sum(-1, keepdim=True).clamp(min=1.0))
            coef_2 = coef_1.clamp(0.8, 1.2)
            a = adv[:, None]
            per_token = -torch.minimum(coef_1 * a, coef_2 * a)
            kl = torch.exp(ref - x) - (ref - x) - 1
            per_token = per_token + 0.1 * kl * coef_1
            loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
        loss.backward()
        runs.append((loss, x.grad))
    torch.testing.assert_close(runs[0][0], runs[1][0])
    torch.testing.assert_close(runs[0][1], runs[1][1])


def test_geo_mean_refuses_token_level_weights():
    logp, old, adv, mask, _, _ = _rollout()
    with pytest.raises(ValueError, match="token-level weights"):
        policy_loss(logp, old, adv, mask, loss_type="geo_mean", token_mask=mask)


@pytest.mark.parametrize("loss_type,kw", [("ppo", {"dual_clip": 3.0}), ("grpo", {}),
                                          ("dr_grpo", {"loss_scale_factor": 24.0}),
                                          ("gspo", {"gspo_form": "verl"}),
                                          ("gspo", {"gspo_form": "trl"}), ("cispo", {}),
                                          ("sapo", {})],
                         ids=["ppo", "grpo", "dr_grpo", "gspo-verl", "gspo-trl", "cispo",
                              "sapo"])
@pytest.mark.parametrize("seq_adv", [False, True], ids=["token-adv", "seq-adv"])
def test_packed_equals_padded(loss_type, kw, seq_adv):
    logp, old, adv, mask, ref, entropy = _rollout(seed=8, spread=1.0, seq_adv=seq_adv)
    lengths = mask.sum(-1)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    pack = lambda t: torch.cat([t[i, :lengths[i]] for i in range(6)])  # noqa: E731
    is_w = torch.rand(6)
    kw = dict(loss_type=loss_type, is_weights=is_w, kl_coef=0.1, entropy_coef=0.01, **kw)
    x = leaf(logp)
    padded, _ = policy_loss(x, old, adv, mask, ref_logprobs=ref, entropy=entropy, **kw)
    padded.backward()
    y = leaf(pack(logp))
    packed, _ = policy_loss(y, pack(old), adv if seq_adv else pack(adv),
                            torch.ones(int(lengths.sum()), dtype=torch.bool),
                            ref_logprobs=pack(ref), entropy=pack(entropy), cu_seqlens=cu, **kw)
    packed.backward()
    torch.testing.assert_close(packed, padded)
    torch.testing.assert_close(y.grad, pack(x.grad))


@pytest.mark.parametrize("seq_adv", [False, True], ids=["token-adv", "seq-adv"])
def test_geo_mean(seq_adv):
    """GMPO against verl's formula (reference), packed == padded, and the two-pass path from
    hidden states (a sequence-level loss)."""
    logp, old, adv, mask, ref, entropy = _rollout(seed=9, spread=0.8, seq_adv=seq_adv)
    kw = dict(loss_type="geo_mean", eps_low=0.4, eps_high=0.4, kl_coef=0.1,
              entropy_coef=0.01, is_weights=torch.rand(6, 24) + 0.5)
    _check(mask, logp, old, adv, ref, entropy, **kw)
    lengths = mask.sum(-1)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    pack = lambda t: torch.cat([t[i, :lengths[i]] for i in range(6)])  # noqa: E731
    padded, _ = policy_loss(logp, old, adv, mask, ref_logprobs=ref, entropy=entropy, **kw)
    packed, _ = policy_loss(pack(logp), pack(old), adv if seq_adv else pack(adv),
                            torch.ones(int(lengths.sum()), dtype=torch.bool),
                            ref_logprobs=pack(ref), entropy=pack(entropy), cu_seqlens=cu,
                            **{**kw, "is_weights": pack(kw["is_weights"])})
    torch.testing.assert_close(packed, padded)


@pytest.mark.parametrize("fused", [True, False])
def test_linear_policy_loss_packed_equals_padded(fused):
    hidden, weight, targets, old, adv = _linear_rollout(seed=10)
    mask = targets != -100
    lengths = mask.sum(-1)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    pack = lambda t: torch.cat([t[i, :lengths[i]] for i in range(4)])  # noqa: E731
    seq_adv = adv[:, 0]
    kw = dict(loss_type="grpo", kl_coef=0.05, entropy_coef=0.01, fused=fused,
              is_weights=torch.rand(4) + 0.5, backend="torch")
    h = leaf(hidden)
    padded, _ = prefkern.losses.linear_policy_loss(h, weight, targets, old, seq_adv,
                                                   ref_logprobs=old - 0.1, **kw)
    padded.backward()
    hp = leaf(pack(hidden))
    packed, _ = prefkern.losses.linear_policy_loss(hp, weight, pack(targets), pack(old), seq_adv,
                                                   ref_logprobs=pack(old) - 0.1, cu_seqlens=cu,
                                                   **kw)
    packed.backward()
    torch.testing.assert_close(packed, padded)
    torch.testing.assert_close(hp.grad, pack(h.grad))
