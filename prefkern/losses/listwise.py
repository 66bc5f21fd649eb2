"""Listwise and regression preference losses on sequence scalars (float64 math, fp32 out)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from prefkern.losses.preference import REDUCTIONS, _f64, _reduce


def _check(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def pro_loss(scores: Tensor, *, temperature: float = 1.0, sft_weight: float = 0.0,
             reduction: str = "mean") -> Tensor:
    """PRO (Song et al. 2024, "Preference Ranking Optimization"): Plackett-Luce over K ranked
    responses, best first. scores (B, K): length-normalized log-probs (PRO uses no reference);
    ``-sum_{k<K} log(exp(s_k / T) / sum_{i>=k} exp(s_i / T)) + sft_weight * (-s_1)`` per list.
    (PRO's reward-gap-dependent temperatures are not modelled: one T.)"""
    _check(reduction)
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError("scores must be (B, K) with K >= 2, best response first")
    z = _f64(scores) / temperature
    tail_lse = torch.logcumsumexp(z.flip(-1), -1).flip(-1)  # logsumexp over i >= k
    losses = -(z - tail_lse)[:, :-1].sum(-1) - sft_weight * _f64(scores)[:, 0]
    return _reduce(losses, reduction).float()


def lipo_lambda_loss(scores: Tensor, labels: Tensor, *, reduction: str = "mean") -> Tensor:
    """LiPO-lambda (Liu et al. 2024, "LiPO: Listwise Preference Optimization"): scores (B, K)
    s_i = beta * log-ratio of response i, labels (B, K) graded relevance psi_i;
    ``sum_{psi_i > psi_j} Delta_ij * log(1 + exp(-(s_i - s_j)))`` per list with LambdaLoss
    weights ``Delta_ij = |G_i - G_j| * |1 / D(tau_i) - 1 / D(tau_j)|``, G = 2^psi - 1,
    D(tau) = log2(1 + tau), tau the rank of s_i under the current scores (1 = highest),
    detached. DPO is the K = 2 case up to the weight."""
    _check(reduction)
    if scores.dim() != 2 or labels.shape != scores.shape:
        raise ValueError("scores and labels must both be (B, K)")
    s, psi = _f64(scores), _f64(labels)
    rank = torch.argsort(torch.argsort(s.detach(), dim=-1, descending=True), dim=-1) + 1
    inv_d = 1.0 / torch.log2(1.0 + rank.to(s.dtype))
    gain = torch.pow(2.0, psi) - 1.0
    weight = (gain[:, :, None] - gain[:, None, :]).abs() * \
        (inv_d[:, :, None] - inv_d[:, None, :]).abs()
    better = psi[:, :, None] > psi[:, None, :]
    pair = F.softplus(-(s[:, :, None] - s[:, None, :]))
    losses = torch.where(better, weight * pair, 0).sum((-2, -1))
    return _reduce(losses, reduction).float()


def set_bt_loss(logratios: Tensor, rewards: Tensor, *, beta: float = 0.1,
                weighting: str = "deviation", mask: Tensor | None = None,
                reduction: str = "mean") -> Tensor:
    """Set-level Bradley-Terry (MPO: Gupta et al. 2024, "Multi-Preference Optimization:
    Generalizing DPO via Set-Level Contrasts", arXiv 2412.04628) over K responses per prompt.
    With s = beta * logratios (log pi - log pi_ref), r the rewards and r_bar their mean over
    the valid responses, the positives Y+ are the responses with r > r_bar:
    ``-log(sum_{Y+} w e^s / sum_{all} w e^s)`` per prompt, with deviation weights
    ``w = |r - r_bar|`` (``weighting="deviation"``) or w = 1 (``"uniform"``). A prompt with no
    positive or no negative has no contrast: loss 0, and it leaves the mean. logratios,
    rewards, mask (B, K); mask marks the valid responses (all when None). K = 2 with uniform
    weights is DPO's sigmoid loss."""
    _check(reduction)
    if weighting not in ("deviation", "uniform"):
        raise ValueError(f"weighting must be 'deviation' or 'uniform', got {weighting!r}")
    if logratios.dim() != 2 or rewards.shape != logratios.shape or \
            (mask is not None and mask.shape != logratios.shape):
        raise ValueError("logratios, rewards (and mask) must all be (B, K)")
    s, r = beta * _f64(logratios), _f64(rewards).detach()
    valid = torch.ones_like(s, dtype=torch.bool) if mask is None else mask.bool()
    count = valid.sum(-1, keepdim=True).clamp(min=1)
    r_bar = torch.where(valid, r, 0).sum(-1, keepdim=True) / count
    positive = valid & (r > r_bar)
    negative = valid & ~positive
    w = (r - r_bar).abs() if weighting == "deviation" else torch.ones_like(r)
    contrast = positive.any(-1) & negative.any(-1)
    # rows without a contrast score a constant (num = den) so that no inf - inf reaches the
    # gradient; w = 0 drops a response (log w = -inf)
    keep = contrast[:, None]
    logits = torch.where(keep, s + torch.log(w), 0)
    neg_inf = torch.full_like(s, -float("inf"))
    num = torch.logsumexp(torch.where(positive | ~keep, logits, neg_inf), -1)
    den = torch.logsumexp(torch.where(valid | ~keep, logits, neg_inf), -1)
    losses = torch.where(contrast, den - num, 0)
    if reduction == "mean":
        return (losses.sum() / contrast.sum().clamp(min=1)).float()
    return _reduce(losses, reduction).float()


def sppo_loss(logratios: Tensor, win_probs: Tensor, *, eta: float = 1000.0,
              reduction: str = "mean") -> Tensor:
    """SPPO (Wu et al. 2024, "Self-Play Preference Optimization"): ``(log pi / pi_t -
    eta (P(y > pi_t) - 1/2))^2`` per response; logratios against the previous iterate pi_t,
    win_probs the estimated probabilities of beating it. (sppo_hard, the two-response hard-label
    form, is a preference_loss type.)"""
    _check(reduction)
    losses = (_f64(logratios) - eta * (_f64(win_probs) - 0.5)) ** 2
    return _reduce(losses, reduction).float()


def irepo_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, pref_probs: Tensor, *,
               beta: float = 0.1, eps: float = 1e-6, reduction: str = "mean") -> Tensor:
    """iREPO (Le et al. 2024): regress the implicit reward difference on the logit of a soft
    empirical preference p: ``(beta (Delta_w - Delta_l) - log(p / (1 - p)))^2``, p clamped to
    [eps, 1 - eps]."""
    _check(reduction)
    p = _f64(pref_probs).clamp(eps, 1 - eps)
    target = torch.log(p) - torch.log1p(-p)
    losses = (beta * (_f64(chosen_logratios) - _f64(rejected_logratios)) - target) ** 2
    return _reduce(losses, reduction).float()


__all__ = ["irepo_loss", "lipo_lambda_loss", "pro_loss", "set_bt_loss", "sppo_loss"]
