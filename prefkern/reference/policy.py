"""Reference policy-gradient and value losses, float64, written from the trainers' formulas:
verl-project/verl 1dda039 (verl/trainer/ppo/core_algos.py: compute_policy_loss_vanilla,
_gspo, _cispo, _sapo, _gpg, _clip_cov, _kl_cov, agg_loss, compute_value_loss) and
huggingface/trl f2cd577 (trl/trainer/grpo_trainer.py ``_compute_loss``)."""

from __future__ import annotations

import torch

from prefkern.reference.kl import kl_estimate_ref


def agg_loss_ref(loss_mat, mask, mode, normalizer=None, loss_scale_factor=None,
                 seq_count="all"):
    """verl's agg_loss; without a normalizer the seq-mean modes divide by B (``"all"``) or by
    the sequences with a valid token (``"nonempty"``, verl 1dda039's default)."""
    m = mask.double()
    if mode == "token-sum":
        return (loss_mat * m).sum()
    if mode == "token-mean":
        return (loss_mat * m).sum() / (m.sum().clamp(min=1) if normalizer is None else normalizer)
    b = normalizer
    if b is None:
        b = loss_mat.shape[0] if seq_count == "all" else (m.sum(-1) > 0).sum()
    seq = (loss_mat * m).sum(-1)
    if mode == "seq-mean-token-mean":
        seq = seq / m.sum(-1).clamp(min=1)
    out = seq.sum() / b
    if mode == "seq-mean-token-sum-norm":
        out = out / (loss_mat.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return out


def _defaults(loss_type, agg):
    trl = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean",
           "dr_grpo": "seq-mean-token-sum-norm", "dapo": "token-mean"}
    if loss_type in trl:
        return "ppo", agg or trl[loss_type]
    return loss_type, agg or {"gspo": "seq-mean-token-mean",
                              "sapo": "seq-mean-token-mean"}.get(loss_type, "token-mean")


def policy_loss_ref(logprobs, old_logprobs, advantages, mask, *, loss_type="ppo", eps_low=0.2,
                    eps_high=None, dual_clip=None, delta=None, ratio_log_clamp=20.0,
                    gspo_form="verl", cispo_form="verl", tau_pos=1.0, tau_neg=1.05, agg=None,
                    normalizer=None, loss_scale_factor=None, is_weights=None,
                    aux_agg=None, aux_normalizer=None, ref_logprobs=None, kl_coef=0.0,
                    kl_kind="k3", kl_input_clamp=20.0,
                    kl_output_clamp="auto", kl_ratio_weighted=False, entropy=None,
                    entropy_coef=0.0, token_mask=None,
                    clip_cov_ratio=2e-4, clip_cov_lb=1.0, clip_cov_ub=5.0, kl_cov_ratio=2e-4,
                    ppo_kl_coef=1.0, generator=None, seq_count="all"):
    """-> the loss of :func:`prefkern.losses.policy_loss` (metrics not included). Clip-Cov's
    random subset is specified as: keys = torch.rand(mask.shape, generator=generator), the
    candidates with the largest keys. The KL and entropy terms are aggregated with ``aux_agg``
    (None: ``agg``) over ``aux_normalizer`` (None: ``normalizer`` if the modes agree, else the
    local count)."""
    kind, agg = _defaults(loss_type, agg)
    aux = agg if aux_agg is None else aux_agg
    aux_norm = aux_normalizer if aux_normalizer is not None or aux != agg else normalizer

    def aux_terms(loss, kl):
        if kl is not None:
            loss = loss + kl_coef * agg_loss_ref(kl, mask, aux, aux_norm, loss_scale_factor,
                                                 seq_count)
        if entropy is not None and entropy_coef != 0.0:
            loss = loss - entropy_coef * agg_loss_ref(entropy.double(), mask, aux, aux_norm,
                                                      loss_scale_factor, seq_count)
        return loss

    eps_high = eps_low if eps_high is None else eps_high
    logp, old = logprobs.double(), old_logprobs.double().detach()
    adv = advantages.double()
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)
    m = mask.double()
    neg_kl = logp - old
    if kind == "geo_mean":  # verl compute_policy_loss_geo_mean (GMPO)
        sgn = torch.sign(adv)
        xc = torch.clamp(neg_kl, -eps_low, eps_high)
        xm = sgn * torch.min(sgn * neg_kl, sgn * xc)
        n = m.sum(-1) + 1e-8
        ratio = torch.exp((xm * m).sum(-1) / n)
        seq_adv = (adv.expand_as(logp) * m).sum(-1) / n
        losses = -seq_adv * ratio
        if is_weights is not None:
            w = is_weights.double()
            w = w.unsqueeze(-1).expand_as(logp) if w.dim() == 1 else w
            losses = losses * torch.exp((torch.log(w + 1e-10) * m).sum(-1) / n)
        loss = losses.mean() if normalizer is None else losses.sum() / normalizer
        kl = None
        if ref_logprobs is not None and kl_coef != 0.0:
            kl = kl_estimate_ref(logprobs.double(), ref_logprobs.double(), kl_kind,
                                 input_clamp=kl_input_clamp, output_clamp=kl_output_clamp)
        return aux_terms(loss, kl)
    if kind == "gspo":
        seq = (neg_kl * m).sum(-1) / m.sum(-1).clamp(min=1)
        if gspo_form == "verl":
            log_ratio = torch.clamp(logp - logp.detach() + seq.detach().unsqueeze(-1), max=10.0)
        else:
            log_ratio = seq.unsqueeze(-1).expand_as(logp)
    elif kind in ("clip_cov", "kl_cov"):  # verl: no clamp on the log-ratio
        log_ratio = neg_kl
    else:
        log_ratio = neg_kl if ratio_log_clamp is None else torch.clamp(
            neg_kl, min=-ratio_log_clamp, max=ratio_log_clamp)
    ratio = torch.exp(log_ratio)
    if kind in ("ppo", "gspo"):
        pg1 = -adv * (ratio if delta is None else torch.clamp(ratio, max=delta))
        pg2 = -adv * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
        clip1 = torch.maximum(pg1, pg2)
        if dual_clip is None:
            losses = clip1
        else:
            pg3 = -adv * dual_clip
            losses = torch.where(adv < 0, torch.minimum(pg3, clip1), clip1)
    elif kind in ("clip_cov", "kl_cov"):
        adv_t = adv.expand_as(logp)
        valid = mask.bool()
        cov = (adv_t - adv_t[valid].mean()) * (logp.detach() - logp.detach()[valid].mean())
        pg1 = -adv_t * ratio
        share = clip_cov_ratio if kind == "clip_cov" else kl_cov_ratio
        k = max(int(share * int(valid.sum())), 1)
        if kind == "clip_cov":
            pg2 = -adv_t * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
            candidate = valid & ~(pg2 > pg1) & (cov > clip_cov_lb) & (cov < clip_cov_ub)
            keys = torch.rand(mask.shape, generator=generator, device=mask.device).double()
            keys = torch.where(candidate, keys, -float("inf")).reshape(-1)
            top = keys.topk(min(k, int(candidate.sum()))).indices
            cut = torch.zeros_like(keys, dtype=torch.bool).index_fill(0, top, True)
            losses = torch.where(cut.view(mask.shape), 0, torch.maximum(pg1, pg2))
        else:
            flat = torch.where(valid, cov, -float("inf")).reshape(-1)
            top = flat.topk(min(k, int(valid.sum()))).indices
            chosen = torch.zeros_like(flat, dtype=torch.bool).index_fill(0, top, True)
            losses = torch.where(chosen.view(mask.shape), pg1 + ppo_kl_coef * neg_kl.abs(), pg1)
    elif kind == "cispo":
        w = (torch.clamp(ratio, 1 - eps_low, 1 + eps_high) if cispo_form == "verl"
             else torch.clamp(ratio, max=eps_high)).detach()
        losses = -adv * w * logp
    elif kind == "sapo":
        tau = torch.where(adv > 0, torch.full_like(adv, tau_pos), torch.full_like(adv, tau_neg))
        losses = -torch.sigmoid(tau * (ratio - 1)) * (4 / tau) * adv
    else:
        losses = -adv * logp
    if token_mask is not None:
        losses = losses * token_mask.double()
    if is_weights is not None:
        w = is_weights.double().detach()
        losses = losses * (w.unsqueeze(-1) if w.dim() == 1 else w)
    kl = None
    if ref_logprobs is not None and kl_coef != 0.0:
        kl = kl_estimate_ref(logprobs.double(), ref_logprobs.double(), kl_kind,
                             input_clamp=kl_input_clamp, output_clamp=kl_output_clamp)
        if kl_ratio_weighted:  # TRL's use_bias_correction_kl: per_token_kl * coef_1, the
            # (B, 1) sequence ratio at importance_sampling_level="sequence"
            kl = kl * torch.exp(log_ratio if kind == "gspo" and gspo_form == "trl" else neg_kl)
    return aux_terms(agg_loss_ref(losses, mask, agg, normalizer, loss_scale_factor, seq_count),
                     kl)


def value_loss_ref(values, old_values, returns, mask, *, clip=0.2, agg="token-mean",
                   normalizer=None, loss_scale_factor=None, seq_count="all"):
    v, old, ret = values.double(), old_values.double(), returns.double()
    if clip is None:
        per_token = (v - ret) ** 2
    else:
        v_clip = old + torch.clamp(v - old, -clip, clip)
        per_token = torch.maximum((v - ret) ** 2, (v_clip - ret) ** 2)
    return 0.5 * agg_loss_ref(per_token, mask, agg, normalizer, loss_scale_factor, seq_count)
