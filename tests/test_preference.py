"""Preference losses on sequence log-probs against their float64 references (TRL f2cd577's
formulas), and the sequence reductions they sit on."""

from __future__ import annotations

import pytest
import torch
from compare import assert_rule, leaf

import prefkern
from prefkern.losses import (
    cpo_loss,
    ld_sequence_logps,
    linear_preference_loss,
    orpo_loss,
    preference_loss,
    sequence_reduce,
    token_sums,
)
from prefkern.losses.preference import DPO_LOSS_TYPES
from prefkern.reference import cpo_loss_ref, orpo_loss_ref, preference_loss_ref


def _pairs(b=16, scale=30.0, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, 200, (2, b), generator=gen)
    per_token = -torch.rand(2, b, generator=gen) * 3 - 0.05  # mean log-prob per token
    policy = per_token * lengths  # chosen, rejected
    reference = policy + torch.randn(2, b, generator=gen) * scale / 10  # log-ratios ~ scale/10
    logps = torch.cat([policy, reference])
    return [t.to(dtype) for t in logps], lengths


def _check(fn, ref_fn, logps, n_grad, reduction="mean", **kw):
    """The loss and the gradients of the first n_grad inputs, against the fp64 reference."""
    runs = []
    for f, dtype in ((fn, None), (ref_fn, torch.float64), (ref_fn, None)):
        xs = [leaf(t, dtype) if i < n_grad else t.to(dtype or t.dtype)
              for i, t in enumerate(logps)]
        out = f(*xs, reduction=reduction, **kw)
        loss = out[0] if isinstance(out, tuple) else out
        g = torch.linspace(0.5, 1.5, loss.numel()).view(loss.shape).to(loss.dtype)
        (loss * g).sum().backward()
        # an input the loss does not depend on (sft: the rejected side) has a zero gradient
        grads = [torch.zeros_like(x) if x.grad is None else x.grad for x in xs[:n_grad]]
        runs.append([loss.float() if f is fn else loss, *grads])
    for i, (o, r, b) in enumerate(zip(*runs, strict=True)):
        assert_rule(o, r, b, f"output {i}", reduction=len(logps[0]))
    return runs[0]


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
@pytest.mark.parametrize("f_divergence", ["reverse_kl", "forward_kl", "js_divergence",
                                          "alpha_divergence"])
def test_dpo_loss_types(loss_type, f_divergence):
    logps, lengths = _pairs()
    _check(preference_loss, preference_loss_ref, logps, 4, loss_type=loss_type, beta=0.1,
           label_smoothing=0.1, f_divergence=f_divergence, chosen_lengths=lengths[0],
           rejected_lengths=lengths[1])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mixtures_weights_reductions(reduction):
    """A list of loss types with weights (TRL's loss_weights), WPO pair weights, fp16 inputs
    (the alpha-divergence cap of 11), no reference (reference-free)."""
    logps, lengths = _pairs(dtype=torch.float16, scale=5.0)
    gen = torch.Generator().manual_seed(3)
    w_c, w_r = torch.rand(2, 16, generator=gen)
    kw = dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[1.0, 0.5, 0.2],
              chosen_lengths=lengths[0], rejected_lengths=lengths[1], chosen_weights=w_c,
              rejected_weights=w_r, f_divergence="alpha_divergence", f_alpha=0.3)
    out = _check(preference_loss, preference_loss_ref, logps, 4, reduction, **kw)
    assert out[0].shape == ((16,) if reduction == "none" else ())
    _check(preference_loss, preference_loss_ref, logps[:2], 2, reduction, loss_type="hinge")


def test_huge_log_ratios_stay_finite():
    """Log-ratios of hundreds of nats (a policy far from its reference) give finite losses
    and gradients for the bounded loss types."""
    logps, lengths = _pairs(scale=3000.0)
    for loss_type in ("sigmoid", "hinge", "robust", "nca_pair", "bco_pair", "apo_zero",
                      "apo_down", "aot", "ipo", "sigmoid_norm", "exo_pair"):
        xs = [leaf(t) for t in logps]
        loss, metrics = preference_loss(*xs, loss_type=loss_type, label_smoothing=0.1,
                                        chosen_lengths=lengths[0], rejected_lengths=lengths[1])
        loss.backward()
        assert torch.isfinite(loss), loss_type
        assert all(torch.isfinite(x.grad).all() for x in xs), loss_type


def test_metrics_are_trls():
    logps, lengths = _pairs()
    _, m = preference_loss(*logps, f_divergence="forward_kl", beta=0.2)
    c, r = logps[0] - logps[2], logps[1] - logps[3]
    torch.testing.assert_close(m["rewards/chosen"], (0.2 * c).mean())  # raw log-ratios
    torch.testing.assert_close(m["rewards/margins"], (0.2 * (c - r)).mean())
    torch.testing.assert_close(m["rewards/accuracies"], (c > r).float().mean())
    assert not any(v.requires_grad for v in m.values())


@pytest.mark.parametrize("loss_type,alpha", [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0),
                                             ("simpo", 0.0), ("alphapo", 0.25),
                                             ("sigmoid", 0.1)])
def test_cpo_simpo_alphapo(loss_type, alpha):
    logps, lengths = _pairs()
    _check(cpo_loss, cpo_loss_ref, [logps[0], logps[1], lengths[0], lengths[1]], 2,
           loss_type=loss_type, alpha=alpha, label_smoothing=0.05, simpo_gamma=0.7)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_orpo(reduction):
    logps, lengths = _pairs()
    _check(orpo_loss, orpo_loss_ref, [logps[0], logps[1], lengths[0], lengths[1]], 2,
           reduction, beta=0.2)


def test_errors():
    logps, lengths = _pairs(b=4)
    with pytest.raises(ValueError, match="not one of"):
        preference_loss(*logps, loss_type="dpo")
    with pytest.raises(ValueError, match="need chosen_lengths"):
        preference_loss(*logps, loss_type="ipo")
    with pytest.raises(ValueError, match="label_smoothing > 0"):
        preference_loss(*logps, loss_type="exo_pair")
    with pytest.raises(ValueError, match="one weight per loss type"):
        preference_loss(*logps, loss_type=["sigmoid", "hinge"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="undefined for aot"):
        preference_loss(*logps, loss_type="aot", chosen_weights=torch.ones(4),
                        rejected_weights=torch.ones(4))


# ------------------------------------------------------------------------- sequence reductions

def _ragged(b=5, t=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(b, t, generator=gen)
    lengths = torch.tensor([0, 3, 12, 7, 1])[:b]
    mask = torch.arange(t)[None] < lengths[:, None]
    mask[2, :4] = False  # a prompt inside the row
    return values, mask, lengths


@pytest.mark.parametrize("reduction", ["sum", "mean", "constant"])
def test_packed_equals_padded(reduction):
    values, mask, lengths = _ragged()
    x = leaf(values)
    padded = sequence_reduce(x, mask, reduction=reduction, normalizer=10.0)
    packed_values = torch.cat([values[i, :lengths[i]] for i in range(5)])
    packed_mask = torch.cat([mask[i, :lengths[i]] for i in range(5)])
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    y = leaf(packed_values)
    packed = sequence_reduce(y, packed_mask, cu_seqlens=cu, reduction=reduction,
                             normalizer=10.0)
    torch.testing.assert_close(packed, padded)
    g = torch.randn(5)
    (padded * g).sum().backward()
    (packed * g).sum().backward()
    want = torch.cat([x.grad[i, :lengths[i]] for i in range(5)])
    torch.testing.assert_close(y.grad, want)
    counts = mask.sum(-1)
    expected = torch.where(mask, values, 0).sum(-1)
    if reduction == "mean":
        expected = expected / counts.clamp(min=1)
    elif reduction == "constant":
        expected = expected / 10.0
    torch.testing.assert_close(padded.detach(), expected)
    assert torch.equal(token_sums(values, mask)[1], counts)


def test_ld_split_is_trls():
    """TRL's ld_alpha masks (f2cd577): pos = mask.cumsum(1), L = min(len_c, len_r)."""
    values_c, mask_c, _ = _ragged(seed=1)
    values_r, mask_r, _ = _ragged(seed=2)
    mask_r = mask_r.flip(0)
    chosen, rejected = ld_sequence_logps(values_c, mask_c, values_r, mask_r, 0.4)
    shared = torch.minimum(mask_c.sum(1), mask_r.sum(1))[:, None]
    for got, x, m in ((chosen, values_c, mask_c), (rejected, values_r, mask_r)):
        pos = m.cumsum(1)
        want = (x * ((pos > 0) & (pos <= shared) & m)).sum(1) + \
            0.4 * (x * ((pos > shared) & m)).sum(1)
        torch.testing.assert_close(got, want)


# ------------------------------------------------------------------ from hidden states and W

def _linear_batch(b=3, t=20, h=24, v=120, dtype=torch.float32, seed=0):
    """TRL's concatenated batch: B chosen then B rejected rows, prompts and padding ignored."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * b, t, h, generator=gen).to(dtype)
    weight = (torch.randn(v, h, generator=gen) * (3 / h**0.5)).to(dtype)
    targets = torch.randint(0, v, (2 * b, t), generator=gen)
    prompt = torch.randint(2, 6, (2 * b, 1), generator=gen)
    length = torch.randint(8, t + 1, (2 * b, 1), generator=gen)
    pos = torch.arange(t)[None]
    targets[(pos < prompt) | (pos >= length)] = -100
    ref_hidden = hidden + 0.1 * torch.randn(hidden.shape, generator=gen).to(dtype)
    return hidden, weight, targets, ref_hidden


def _materialized(hidden, weight, targets, ref_hidden, family, **kw):
    """The spec: fp64-capable linear_logprobs_ref, masked sums, the reference loss."""
    from prefkern.reference import linear_logprobs_ref

    mask = targets != -100
    sums = torch.where(mask, linear_logprobs_ref(hidden, weight, targets), 0).sum(-1)
    counts = mask.sum(-1)
    b = sums.shape[0] // 2
    if family == "cpo":
        return cpo_loss_ref(sums[:b], sums[b:], counts[:b], counts[b:], **kw)
    with torch.no_grad():
        ref = torch.where(mask, linear_logprobs_ref(ref_hidden.to(hidden.dtype), weight.detach(),
                                                    targets), 0).sum(-1)
    return preference_loss_ref(sums[:b], sums[b:], ref[:b], ref[b:], chosen_lengths=counts[:b],
                               rejected_lengths=counts[b:], **kw)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("family,kw", [("dpo", {"loss_type": "sigmoid"}),
                                       ("dpo", {"loss_type": ["ipo", "sft"],
                                                "loss_weights": [1.0, 0.3]}),
                                       ("cpo", {"loss_type": "simpo"})],
                         ids=["sigmoid", "ipo+sft", "simpo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_preference_loss(backend, family, kw, dtype):
    """Loss and gradients against the materialized computation (comparison rule); the
    reference model inside equals precomputed reference log-probs."""
    hidden, weight, targets, ref_hidden = _linear_batch(dtype=dtype)
    runs = []
    for fn, dt in (("ours", None), ("spec", torch.float64), ("spec", None)):
        h, w = leaf(hidden, dt), leaf(weight, dt)
        if fn == "ours":
            ref_kw = {} if family != "dpo" else dict(ref_hidden=ref_hidden, ref_weight=weight)
            loss, _ = linear_preference_loss(h, w, targets, family=family, backend=backend,
                                             **ref_kw, **kw)
        else:
            loss = _materialized(h, w, targets, ref_hidden.to(dt or dtype), family, **kw)
        loss.backward()
        runs.append((loss, h.grad, w.grad))
    for name, o, r, b in zip(("loss", "dhidden", "dweight"), *runs, strict=True):
        assert_rule(o, r, b, name, reduction=120 * 20)
    if family == "dpo":
        mask = targets != -100
        ref = torch.where(mask, prefkern.linear_logprobs(ref_hidden, weight, targets,
                                                         backend=backend), 0).sum(-1)
        given, _ = linear_preference_loss(hidden, weight, targets, family=family,
                                          ref_logps=(ref[:3], ref[3:]), backend=backend, **kw)
        torch.testing.assert_close(given, runs[0][0].detach())


def test_linear_preference_packed_equals_padded():
    hidden, weight, targets, ref_hidden = _linear_batch()
    module = prefkern.nn.LinearPreferenceLoss(loss_type="robust", label_smoothing=0.1)
    keep = (targets != -100).any(0)  # pack only the columns some row uses
    lengths = torch.full((6,), int(keep.sum()))
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    losses, grads = [], []
    for packed in (False, True):
        h = leaf(hidden[:, keep].reshape(-1, 24) if packed else hidden)
        y = targets[:, keep].reshape(-1) if packed else targets
        r = ref_hidden[:, keep].reshape(-1, 24) if packed else ref_hidden
        loss, _ = module(h, weight, y, cu_seqlens=cu if packed else None, ref_hidden=r,
                         ref_weight=weight)
        loss.backward()
        losses.append(loss)
        grads.append(h.grad if packed else h.grad[:, keep].reshape(-1, 24))
    torch.testing.assert_close(losses[1], losses[0])
    torch.testing.assert_close(grads[1], grads[0])


def _trl_wpo_ld_loss(hidden, weight, targets, ref_hidden, ld_alpha, **kw):
    """TRL f2cd577's DPOTrainer on materialized logits: LD-DPO sums (pos = mask.cumsum(1),
    L = min(len_c, len_r)) for policy and reference, WPO weights exp(mean_t(logp_t -
    (lse(2z) - 2 lse(z)))) under no_grad, chosen * rejected times each pair's loss."""
    from prefkern.reference.logprobs import linear_logits

    mask = targets != -100
    b = targets.shape[0] // 2

    def per_token(h, w):
        z = linear_logits(h, w)
        logp = z.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        return torch.where(mask, logp, 0), z

    def ld(x):
        shared = torch.minimum(mask[:b].sum(1), mask[b:].sum(1)).repeat(2)[:, None]
        pos = mask.cumsum(1)
        head, tail = mask & (pos <= shared), mask & (pos > shared)
        return (x * head).sum(1) + ld_alpha * (x * tail).sum(1)

    logp, z = per_token(hidden, weight)
    with torch.no_grad():
        log_denom = torch.logsumexp(2.0 * z, -1) - 2.0 * torch.logsumexp(z, -1)
        aligned = (logp - log_denom) * mask
        weights = torch.exp(aligned.sum(1) / mask.sum(1).clamp_min(1))
        ref = ld(per_token(ref_hidden, weight.detach())[0])
    sums = ld(logp)
    counts = mask.sum(1)
    return preference_loss_ref(sums[:b], sums[b:], ref[:b], ref[b:], chosen_lengths=counts[:b],
                               rejected_lengths=counts[b:], chosen_weights=weights[:b],
                               rejected_weights=weights[b:], **kw)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_wpo_and_ld_alpha_are_trls(backend):
    """use_weighting (sum p^2 from the same pass) and ld_alpha inside the module equal TRL's
    computation on materialized logits, loss and gradients (comparison rule)."""
    hidden, weight, targets, ref_hidden = _linear_batch(dtype=torch.bfloat16)
    kw = dict(loss_type="sigmoid", beta=0.2)
    runs = []
    for fn, dt in (("ours", None), ("spec", torch.float64), ("spec", None)):
        h, w = leaf(hidden, dt), leaf(weight, dt)
        if fn == "ours":
            loss, _ = linear_preference_loss(h, w, targets, ref_hidden=ref_hidden,
                                             ref_weight=weight, use_weighting=True,
                                             ld_alpha=0.3, backend=backend, **kw)
        else:
            loss = _trl_wpo_ld_loss(h, w, targets, ref_hidden.to(h.dtype), 0.3, **kw)
        loss.backward()
        runs.append((loss, h.grad, w.grad))
    for name, o, r, b in zip(("loss", "dhidden", "dweight"), *runs, strict=True):
        assert_rule(o, r, b, name, reduction=120 * 20)
    plain, _ = linear_preference_loss(hidden, weight, targets, ref_hidden=ref_hidden,
                                      ref_weight=weight, backend=backend, **kw)
    assert not torch.allclose(plain, runs[0][0].detach())  # the options change the loss


def test_ld_alpha_leaves_the_sft_term_plain():
    """TRL's sft loss type (e.g. in an MPO mix with sigmoid) is the cross entropy over every
    chosen token, LD-DPO or not: only the preference term takes the LD-weighted sums."""
    hidden, weight, targets, ref_hidden = _linear_batch()
    kw = dict(ref_hidden=ref_hidden, ref_weight=weight, ld_alpha=0.5, beta=0.2,
              backend="torch")
    mixed, _ = linear_preference_loss(hidden, weight, targets, loss_type=["sigmoid", "sft"],
                                      loss_weights=[1.0, 1.0], **kw)
    sigmoid, _ = linear_preference_loss(hidden, weight, targets, loss_type="sigmoid", **kw)
    b = targets.shape[0] // 2
    chosen = targets[:b] != -100
    logits = (hidden[:b] @ weight.T).double()
    sft = torch.nn.functional.cross_entropy(logits[chosen], targets[:b][chosen])
    torch.testing.assert_close((mixed - sigmoid).double(), sft, rtol=1e-5, atol=1e-5)


def test_linear_wpo_and_ld_packed_equals_padded():
    """The packed layout finds each token's position within its sequence for LD-DPO."""
    hidden, weight, targets, ref_hidden = _linear_batch()
    keep = (targets != -100).any(0)
    cu = torch.arange(7) * int(keep.sum())
    outs = []
    for packed in (False, True):
        h = leaf(hidden[:, keep].reshape(-1, 24) if packed else hidden)
        y = targets[:, keep].reshape(-1) if packed else targets
        r = ref_hidden[:, keep].reshape(-1, 24) if packed else ref_hidden
        loss, _ = linear_preference_loss(h, weight, y, cu_seqlens=cu if packed else None,
                                         ref_hidden=r, ref_weight=weight, use_weighting=True,
                                         ld_alpha=0.5, backend="torch")
        loss.backward()
        outs.append((loss, h.grad if packed else h.grad[:, keep].reshape(-1, 24)))
    torch.testing.assert_close(outs[1][0], outs[0][0])
    torch.testing.assert_close(outs[1][1], outs[0][1])


def test_wpo_and_ld_are_dpo_options():
    hidden, weight, targets, _ = _linear_batch()
    with pytest.raises(ValueError, match="DPO options"):
        linear_preference_loss(hidden, weight, targets, family="cpo", ld_alpha=0.5)


# ------------------------------------------------------ unpaired, TDPO, listwise, regression

@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired", "bco", "npo", "simnpo"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_unpaired(loss_type, reduction):
    from prefkern.losses import unpaired_loss
    from prefkern.reference import unpaired_loss_ref

    logps, lengths = _pairs()
    desirable = torch.arange(16) % 3 != 0
    kl_pol, kl_ref = logps[1] + 2.0, logps[3]
    kw = dict(loss_type=loss_type, beta=0.2, desirable_weight=1.3, undesirable_weight=0.7,
              lengths=lengths[0], delta=0.05)
    if loss_type == "kto":
        kw["kl_logps"] = (kl_pol, kl_ref)

    def ours(x, ref, reduction):
        return unpaired_loss(x, ref, desirable, reduction=reduction, **kw)

    def spec(x, ref, reduction):
        return unpaired_loss_ref(x, ref, desirable, reduction=reduction, **kw)

    _check(ours, spec, [logps[0], logps[2]], 2, reduction)
    if loss_type == "kto":  # z0 = the clamped mean of the mismatched pairs' log-ratios
        _, m = unpaired_loss(logps[0], logps[2], desirable, **kw)
        torch.testing.assert_close(m["kl"], (kl_pol - kl_ref).mean().clamp(min=0))


@pytest.mark.parametrize("version", [1, 2])
def test_tdpo(version):
    from prefkern.losses import tdpo_loss
    from prefkern.reference import tdpo_loss_ref

    logps, _ = _pairs()
    gen = torch.Generator().manual_seed(5)
    kls = torch.rand(2, 16, generator=gen) * 20
    _check(tdpo_loss, tdpo_loss_ref, [*logps, kls[0], kls[1]], 6, version=version, beta=0.1,
           alpha=0.5)


def test_hdpo_and_rpo_terms():
    logps, lengths = _pairs()
    _check(preference_loss, preference_loss_ref, logps, 4, hdpo_alpha=0.8, rpo_alpha=0.5,
           chosen_lengths=lengths[0], rejected_lengths=lengths[1])
    plain, _ = preference_loss(*logps)
    sharp, _ = preference_loss(*logps, hdpo_alpha=0.8)
    assert not torch.equal(plain, sharp)


@pytest.mark.parametrize("k", [2, 5])
def test_listwise_and_regression(k):
    from prefkern.losses import irepo_loss, lipo_lambda_loss, pro_loss, sppo_loss
    from prefkern.reference import (
        irepo_loss_ref,
        lipo_lambda_loss_ref,
        pro_loss_ref,
        sppo_loss_ref,
    )

    gen = torch.Generator().manual_seed(k)
    scores = torch.randn(6, k, generator=gen) * 2
    labels = torch.randint(0, 4, (6, k), generator=gen).float()
    _check(lambda s, reduction: pro_loss(s, temperature=0.7, sft_weight=0.1,
                                         reduction=reduction),
           lambda s, reduction: pro_loss_ref(s, temperature=0.7, sft_weight=0.1,
                                             reduction=reduction), [scores], 1)
    _check(lambda s, reduction: lipo_lambda_loss(s, labels, reduction=reduction),
           lambda s, reduction: lipo_lambda_loss_ref(s, labels, reduction=reduction),
           [scores], 1)
    probs = torch.rand(6, k, generator=gen)
    _check(lambda s, reduction: sppo_loss(s, probs, eta=2.0, reduction=reduction),
           lambda s, reduction: sppo_loss_ref(s, probs, eta=2.0, reduction=reduction),
           [scores], 1)
    _check(lambda a, b, reduction: irepo_loss(a, b, probs[:, 0], reduction=reduction),
           lambda a, b, reduction: irepo_loss_ref(a, b, probs[:, 0], reduction=reduction),
           [scores[:, 0], scores[:, 1]], 2)
    if k == 2:  # PRO on two responses is DPO's sigmoid loss on the scores
        torch.testing.assert_close(pro_loss(scores),
                                   -torch.nn.functional.logsigmoid(scores[:, 0] - scores[:, 1])
                                   .mean())


@pytest.mark.parametrize("weighting", ["deviation", "uniform"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_set_bt(weighting, reduction):
    from prefkern.losses import set_bt_loss
    from prefkern.reference import set_bt_loss_ref

    gen = torch.Generator().manual_seed(4)
    logratios = torch.randn(7, 5, generator=gen) * 3
    rewards = torch.randint(0, 4, (7, 5), generator=gen).float()
    mask = torch.rand(7, 5, generator=gen) < 0.8
    rewards[2] = 1.0  # every reward equal: no contrast, loss 0 and out of the mean
    kw = dict(beta=0.3, weighting=weighting, mask=mask)
    _check(lambda s, reduction: set_bt_loss(s, rewards, reduction=reduction, **kw),
           lambda s, reduction: set_bt_loss_ref(s, rewards, reduction=reduction, **kw),
           [logratios], 1, reduction=reduction)
    assert set_bt_loss(logratios, rewards, reduction="none", **kw)[2] == 0


def test_set_bt_on_pairs_is_dpo():
    """K = 2, uniform weights, the better response first: DPO's sigmoid loss."""
    from prefkern.losses import set_bt_loss

    gen = torch.Generator().manual_seed(5)
    logratios = torch.randn(6, 2, generator=gen) * 4
    rewards = torch.tensor([[1.0, 0.0]]).expand(6, 2)
    want = -torch.nn.functional.logsigmoid(0.2 * (logratios[:, 0] - logratios[:, 1])).mean()
    torch.testing.assert_close(set_bt_loss(logratios, rewards, beta=0.2, weighting="uniform"),
                               want)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("version", [1, 2])
def test_linear_tdpo(backend, version):
    """TDPO from hidden states: SeqKL from the fused divergence, against the materialized
    spec (both models' logits, full-vocabulary KL(ref || policy) per token)."""
    from prefkern.reference import linear_divergence_ref, linear_logprobs_ref, tdpo_loss_ref

    hidden, weight, targets, ref_hidden = _linear_batch(seed=version)
    mask = targets != -100
    runs = []
    for fn, dt in (("ours", None), ("spec", torch.float64), ("spec", None)):
        h, w = leaf(hidden, dt), leaf(weight, dt)
        rh = ref_hidden.to(dt or hidden.dtype)
        if fn == "ours":
            loss, _ = linear_preference_loss(h, w, targets, family="tdpo", ref_hidden=rh,
                                             ref_weight=weight, version=version,
                                             backend=backend)
        else:
            logp = torch.where(mask, linear_logprobs_ref(h, w, targets), 0).sum(-1)
            with torch.no_grad():
                ref = torch.where(mask, linear_logprobs_ref(rh, w.detach(), targets), 0).sum(-1)
            kl = linear_divergence_ref(h, w, rh, w.detach(), targets, kind="forward_kl").sum(-1)
            loss = tdpo_loss_ref(logp[:3], logp[3:], ref[:3], ref[3:], kl[:3], kl[3:],
                                 version=version)
        loss.backward()
        runs.append((loss, h.grad, w.grad))
    for name, o, r, b in zip(("loss", "dhidden", "dweight"), *runs, strict=True):
        assert_rule(o, r, b, name, reduction=120 * 20)


# ------------------------------------------------------------ gradient in the forward pass

FUSED_CASES = [
    dict(loss_type="sigmoid"),
    dict(loss_type=["hinge", "ipo", "robust"], loss_weights=[0.5, 1.0, 0.3], label_smoothing=0.1),
    dict(loss_type="exo_pair", label_smoothing=0.05, f_divergence="js_divergence"),
    dict(loss_type="apo_zero", hdpo_alpha=0.8),
    dict(loss_type="sigmoid_norm", ld_alpha=0.4),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kw", FUSED_CASES, ids=["sigmoid", "mixture", "exo-jsd", "apo-hdpo",
                                                 "norm-ld"])
def test_fused_equals_two_pass(backend, kw):
    """The gradient-in-forward path (chunks of whole pairs; a budget of two pairs forces
    several chunks) gives the two-pass loss, metrics and gradients, with the reference model
    inside."""
    hidden, weight, targets, ref_hidden = _linear_batch(b=5, t=12, v=90, dtype=torch.float32)
    bias = torch.randn(90)
    runs = []
    for fused in (True, False):
        h, w, b = leaf(hidden), leaf(weight), leaf(bias)
        loss, metrics = linear_preference_loss(
            h, w, targets, bias=b, ref_hidden=ref_hidden, ref_weight=weight.detach(),
            ref_bias=bias, softcap=7.0, temperature=0.9, fused=fused,
            budget_bytes=2 * 2 * 12 * 90 * 4, backend=backend, **kw)
        (3 * loss).backward()
        runs.append((loss, metrics, h.grad, w.grad, b.grad))
    (loss, metrics, *grads), (want, want_metrics, *want_grads) = runs
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-7)
    for key in want_metrics:
        torch.testing.assert_close(metrics[key], want_metrics[key], rtol=1e-5, atol=1e-6)
    for g, wg in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, wg, rtol=1e-4, atol=1e-6 * wg.abs().max().item())


def test_fused_backward_runs_no_gemm_and_falls_back(monkeypatch):
    """The fused loss's backward only scales gradients the forward formed; a budget below one
    pair, a packed batch or a non-separable loss type take the two-pass path."""
    from prefkern.ops import gemm, preference_fused

    hidden, weight, targets, ref_hidden = _linear_batch(b=3, t=10, v=60)
    ref = dict(ref_logps=(torch.randn(3) - 20, torch.randn(3) - 20), backend="torch")
    hh, ww = leaf(hidden), leaf(weight)
    loss, _ = linear_preference_loss(hh, ww, targets, **ref)

    def no_gemm(*args, **kwargs):
        raise AssertionError("a GEMM ran in the backward")

    for target, name in ((gemm, "fp32_mm"), (gemm, "accumulate_mm"), (torch, "mm"),
                         (torch, "matmul")):
        monkeypatch.setattr(target, name, no_gemm)
    loss.backward()
    monkeypatch.undo()
    calls = []
    real = preference_fused.fused_dpo
    monkeypatch.setattr(preference_fused, "fused_dpo",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    linear_preference_loss(hidden, weight, targets, budget_bytes=100, **ref)
    linear_preference_loss(hidden, weight, targets, loss_type="aot", **ref)
    linear_preference_loss(hidden, weight, targets, loss_type=["sigmoid", "sft"], **ref)
    assert not calls
    linear_preference_loss(hidden, weight, targets, **ref)
    assert calls == [1]


def test_fused_path_honours_pair_weights_and_autocast():
    """Per-pair weights given by the caller take the two-pass path (the chunks would misalign
    them); under autocast the fused path still computes fp32 logits."""
    hidden, weight, targets, _ = _linear_batch(b=3, t=10, v=60)
    ref = dict(ref_logps=(torch.randn(3) - 20, torch.randn(3) - 20), backend="torch")
    w = torch.tensor([0.2, 1.0, 3.0])
    grads = []
    for fused in (True, False):
        h = leaf(hidden)
        loss, _ = linear_preference_loss(h, weight, targets, chosen_weights=w,
                                         rejected_weights=w, fused=fused,
                                         budget_bytes=2 * 10 * 60 * 4, **ref)
        loss.backward()
        grads.append((loss, h.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, _ = linear_preference_loss(hidden.bfloat16(), weight.bfloat16(), targets, **ref)
        two_pass, _ = linear_preference_loss(hidden.bfloat16(), weight.bfloat16(), targets,
                                             fused=False, **ref)
    torch.testing.assert_close(fused, two_pass, rtol=1e-5, atol=1e-5)
