"""DisCO (Li et al. 2025, "DisCO: Reinforcing Large Reasoning Models with Discriminative
Constrained Optimization", arXiv:2505.12366), the loss zoo's ``pg.disco``: a discriminative
objective over each prompt's correct (positive) and incorrect (negative) responses, with a
trust region on KL(pi_old || pi) as a squared-hinge penalty, as the authors' code computes it
(Optimization-AI/DisCO bd2b078, verl/verl/trainer/ppo/core_algos.py,
``compute_policy_loss_disco{,b}_{logL,Lratio}``). Its loop transcription:
:func:`prefkern.reference.disco_loss_ref`."""

from __future__ import annotations

import torch
from torch import Tensor

from prefkern import _checks
from prefkern.losses.group_regression import group_mean
from prefkern.ops.group_advantages import dense_group_index, gather_rows
from prefkern.ops.kl_estimate import kl_estimate

SCORES = ("log_l", "l_ratio")
KL_KINDS = ("k1", "k3")


def _check(logprobs, old_logprobs, mask, rewards, group_ids, score, kl_kind, tau) -> None:
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if kl_kind not in KL_KINDS:
        raise ValueError(f"kl_kind must be one of {KL_KINDS}, got {kl_kind!r}")
    if tau is not None:
        _checks.check_positive("tau", tau)
    _checks.check_float("logprobs", logprobs)
    _checks.check_float("old_logprobs", old_logprobs)
    _checks.check_float("rewards", rewards)
    _checks.check_index("group_ids", group_ids)
    if logprobs.dim() != 2 or old_logprobs.shape != logprobs.shape \
            or mask.shape != logprobs.shape:
        raise ValueError(f"logprobs, old_logprobs and mask must be one (B, T) shape, got "
                         f"{tuple(logprobs.shape)}, {tuple(old_logprobs.shape)}, "
                         f"{tuple(mask.shape)}")
    b = logprobs.shape[0]
    if rewards.shape != (b,) or group_ids.shape != (b,):
        raise ValueError(f"rewards and group_ids must be ({b},), got {tuple(rewards.shape)} "
                         f"and {tuple(group_ids.shape)}")
    _checks.check_same_device(logprobs=logprobs, old_logprobs=old_logprobs, mask=mask,
                              rewards=rewards, group_ids=group_ids)


def disco_loss(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor, rewards: Tensor,
               group_ids: Tensor, *, score: str = "log_l", tau: float | None = 10.0,
               beta: float = 1e3, delta: float = 1e-4, kl_kind: str = "k1",
               process_group=None) -> tuple[Tensor, dict]:
    """DisCO's loss on (B, T) per-token log-probs of B responses (response tokens where
    ``mask``), their outcome ``rewards`` (B,) (1: correct, 0: incorrect, anything else: neither)
    and prompt ``group_ids`` (B,).

    Score of a response: ``log_l`` its mean token log-prob, ``l_ratio`` its mean token ratio
    ``exp(logp - old_logp)``. For each prompt with at least one positive and one negative
    response: ``J_q = mean_pos s - tau * log(mean_neg exp(s / tau))`` (DisCO), or with
    ``tau=None`` ``mean_pos s - mean_neg s`` (DisCO-b); prompts without both contribute 0.
    ``loss = -sum_q J_q / Q + beta / 2 * relu(kl - delta) ** 2`` with Q every prompt in the
    batch (as the authors' code divides) and ``kl`` the masked token mean of KL(pi_old || pi)'s
    estimate on old samples: k1 ``old_logp - logp`` or k3 ``ratio - 1 - (logp - old_logp)``.

    Gradients are the authors' code's; its printed value differs: it writes the log-mean-exp
    as ``sum / sum.detach()`` and the penalty as ``relu(beta (kl - delta)).detach() * kl``, so
    the same gradients with another value. Defaults are its scripts' (tau 10 for log_l, 1 for
    l_ratio; beta 1e3; delta 1e-4; kl k1).

    ``process_group`` (data parallel, every rank the same B, ranks in batch order): prompts,
    Q and the KL are the whole batch's, as the authors' code all-gathers them (one all-gather
    of the scores, rewards, ids and token counts); each rank gets its rows' share, the shares
    summing to the whole batch's loss in value and gradient (the authors' code has every rank
    compute the whole loss through a differentiable all-gather, whose backward sums the ranks'
    identical gradients: world size times this share's; a data-parallel average of either
    leaves the same ratio). No host sync. Returns (loss fp32, {"kl", "constraint_active",
    "valid_groups"}): the whole batch's KL estimate, whether it exceeds delta, the prompts
    that count."""
    _check(logprobs, old_logprobs, mask, rewards, group_ids, score, kl_kind, tau)
    keep = mask.bool()  # padding may hold -inf or NaN log-probs: never let them in
    logp = torch.where(keep, logprobs.to(torch.float64), 0.0)
    old = torch.where(keep, old_logprobs.to(torch.float64), 0.0)
    m = keep.to(torch.float64)
    log_ratio = logp - old
    ratio = log_ratio.exp()
    # KL(pi_old || pi) estimated on pi_old's samples: the estimator of old against the policy
    per_token_kl = kl_estimate(old, logp, kl_kind, input_clamp=None, output_clamp=None)
    kl_sum, tokens = (per_token_kl * m).sum(-1), m.sum(-1)
    s = ((logp if score == "log_l" else ratio) * m).sum(-1) / tokens.clamp(min=1)
    r = rewards.to(torch.float64)

    all_s, all_r, all_ids, all_kl, all_tokens, rows = \
        s.detach(), r, group_ids, kl_sum.detach(), tokens, slice(None)
    if process_group is not None:
        all_s, all_r, all_ids, all_kl, all_tokens, rows = gather_rows(
            process_group, s, r, group_ids, kl_sum, tokens)
    index = dense_group_index(all_ids)
    pos, neg = (all_r == 1).to(torch.float64), (all_r == 0).to(torch.float64)
    pos_frac, sizes = group_mean(pos, index)
    neg_frac, _ = group_mean(neg, index)
    n_pos, n_neg = pos_frac * sizes, neg_frac * sizes
    valid = (n_pos > 0) & (n_neg > 0)
    # each negative's share of the group's negative term: value, and weight on its score's
    # gradient (1 / n_neg for DisCO-b's mean; softmax(s / tau) over the negatives for DisCO's
    # tau log mean exp(s / tau), whose value is split evenly over them)
    if tau is None:
        weight, neg_value = 1 / n_neg.clamp(min=1), torch.zeros_like(all_s)
    else:
        z = torch.where(neg > 0, all_s / tau, -torch.inf)
        top = torch.full_like(z, -torch.inf).index_reduce_(0, index, z, "amax")[index]
        top = torch.where(torch.isfinite(top), top, 0.0)
        exp_mean, _ = group_mean(torch.where(neg > 0, (z - top).exp(), 0.0), index)
        log_mean = (exp_mean / neg_frac.clamp(min=1e-300)).clamp(min=1e-300).log() + top
        weight = torch.where(neg > 0, (z - top).exp() / (exp_mean * sizes).clamp(min=1e-300),
                             0.0)
        neg_value = tau * log_mean / n_neg.clamp(min=1) - weight * all_s
    pos, neg, valid = pos[rows], neg[rows], valid[rows]
    pos_term = pos * s / n_pos[rows].clamp(min=1)  # over a group: the mean over its positives
    neg_term = neg * (neg_value[rows] + weight[rows] * s)
    groups = index.max() + 1 if index.numel() else torch.ones((), dtype=torch.int64,
                                                                device=index.device)
    objective = torch.where(valid, pos_term - neg_term, 0.0).sum() / groups

    total_tokens = all_tokens.sum().clamp(min=1)
    kl = all_kl.sum() / total_tokens  # detached: the whole batch's estimate
    excess = torch.relu(kl - delta)
    share = kl_sum.sum() / total_tokens  # this rank's part of kl, with its gradient
    penalty = 0.5 * beta * excess.square() * (tokens.sum() / total_tokens) \
        + beta * excess * (share - share.detach())
    loss = -objective + penalty
    metrics = {"kl": kl.float(), "constraint_active": (kl > delta).float(),
               "valid_groups": torch.where(valid, 1.0 / sizes[rows], 0.0).sum().float()}
    if process_group is not None:
        import torch.distributed as dist

        dist.all_reduce(metrics["valid_groups"], group=process_group)
    return loss.float(), metrics
