"""Reference losses, written from the trainers' formulas with everything materialized."""

from __future__ import annotations

import torch

from prefkern.reference.divergence import linear_divergence_ref
from prefkern.reference.logprobs import linear_logprobs_ref


def _reduce(per_token, mask, reduction, normalizer):
    masked = torch.where(mask, per_token, 0)
    if reduction == "none":
        return masked
    if normalizer is not None:
        return masked.sum() / normalizer
    if reduction == "sum":
        return masked.sum()
    return masked.sum() / max(int(mask.sum()), 1)


def distill_loss_ref(hidden, weight, teacher_hidden, teacher_weight, labels, *, kind="jsd",
                     beta=0.5, alpha=0.5, temperature=1.0, weight_soft_loss=1.0,
                     weight_hard_loss=0.0, reduction="batchmean", num_items_in_batch=None,
                     ignore_index=-100, bias=None, teacher_bias=None, softcap=None,
                     logit_scale=None, teacher_softcap=None, teacher_logit_scale=None):
    """TRL GKD's generalized_jsd_loss (sum over valid tokens / their count, or /
    num_items_in_batch) of the kind's per-token divergence, plus Liger's hard loss: the NLL of
    the labels under the untempered student, reduced the same way. -> (loss, metrics)."""
    mask = labels != ignore_index
    div = linear_divergence_ref(hidden, weight, teacher_hidden, teacher_weight, labels,
                                kind=kind, beta=beta, alpha=alpha, temperature=temperature,
                                ignore_index=ignore_index, bias=bias, ref_bias=teacher_bias,
                                softcap=softcap, logit_scale=logit_scale,
                                ref_softcap=teacher_softcap, ref_logit_scale=teacher_logit_scale)
    soft = _reduce(div, mask, reduction, num_items_in_batch)
    hard = torch.zeros_like(soft)  # not computed when off (the ops skip it too)
    if weight_hard_loss != 0:
        logp = linear_logprobs_ref(hidden, weight, labels, bias, ignore_index=ignore_index,
                                   softcap=softcap, logit_scale=logit_scale)
        hard = _reduce(-logp, mask, reduction, num_items_in_batch)
    loss = weight_soft_loss * soft + weight_hard_loss * hard
    return loss, {"soft_loss": soft.detach(), "hard_loss": hard.detach()}


def topk_forward_kl_ref(logprobs, teacher_logprobs, mask=None, *, log_prob_min_clamp=None,
                        loss_max_clamp=None):
    """verl forward_kl_topk: sum_k exp(t_k) (t_k - s_k), lower clamps first, then >= 0, then
    the max clamp."""
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    s, t = logprobs.to(dtype), teacher_logprobs.to(dtype).detach()
    if log_prob_min_clamp is not None:
        s, t = torch.clamp(s, min=log_prob_min_clamp), torch.clamp(t, min=log_prob_min_clamp)
    per_k = torch.exp(t) * (t - s)
    if mask is not None:
        per_k = per_k * mask
    loss = torch.clamp(per_k.sum(-1), min=0)
    if loss_max_clamp is not None:
        loss = torch.clamp(loss, -loss_max_clamp, loss_max_clamp)
    return loss
