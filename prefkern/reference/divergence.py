"""Reference full-vocabulary divergences between a policy p and a reference (teacher) q.

With a = log p = log_softmax(z_p) and b = log q = log_softmax(z_q) over the whole vocabulary:

    forward_kl  KL(q || p) = sum q (b - a)                 teacher -> student, distillation
    reverse_kl  KL(p || q) = sum p (a - b)                 the RL penalty direction
    jsd         beta KL(q || m) + (1 - beta) KL(p || m),   m = (1 - beta) p + beta q
                (TRL GKD's generalized JSD; beta = 0 is forward_kl and beta = 1 reverse_kl,
                as TRL special-cases them)
    tv          0.5 sum |p - q|
    alpha       (1 - sum p^alpha q^(1 - alpha)) / (alpha (1 - alpha))  (Amari; alpha = 0 is
                forward_kl and alpha = 1 reverse_kl, its limits)

Terms with a zero probability weight count 0 (0 log 0 = 0), so -inf logits are allowed.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from prefkern.reference.logprobs import compute_dtype, head_logits, linear_logits

KINDS = ("forward_kl", "reverse_kl", "jsd", "tv", "alpha")


class Divergence(NamedTuple):
    """A validated kind with its parameter; jsd and alpha at their end points are the KLs."""

    kind: str
    beta: float = 0.5
    alpha: float = 0.5


def resolve_kind(kind: str, beta: float = 0.5, alpha: float = 0.5) -> Divergence:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "jsd":
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"jsd needs 0 <= beta <= 1, got {beta}")
        if beta in (0.0, 1.0):
            return Divergence("forward_kl" if beta == 0.0 else "reverse_kl")
    if kind == "alpha":
        if not math.isfinite(alpha):
            raise ValueError(f"alpha must be finite, got {alpha}")
        if alpha in (0.0, 1.0):
            return Divergence("forward_kl" if alpha == 0.0 else "reverse_kl")
    return Divergence(kind, float(beta), float(alpha))


def _weighted(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """weight * x with 0 where weight == 0 (0 * inf = 0, and no nan gradient)."""
    zero = weight == 0
    return torch.where(zero, 0, weight * torch.where(zero, 0, x))


def divergence_from_logprobs_ref(a: torch.Tensor, b: torch.Tensor, div: Divergence):
    """a, b (..., V) full-vocabulary log-probs of p and q -> (...) divergence (module doc)."""
    p, q = a.exp(), b.exp()
    if div.kind == "forward_kl":
        return _weighted(q, b - a).sum(-1)
    if div.kind == "reverse_kl":
        return _weighted(p, a - b).sum(-1)
    if div.kind == "tv":
        return 0.5 * (p - q).abs().sum(-1)
    if div.kind == "jsd":
        beta = div.beta
        log_m = torch.logaddexp(a + math.log1p(-beta), b + math.log(beta))
        return (beta * _weighted(q, b - log_m).sum(-1)
                + (1 - beta) * _weighted(p, a - log_m).sum(-1))
    alpha = div.alpha
    both_zero = torch.isneginf(a) & torch.isneginf(b)  # 0^alpha 0^(1 - alpha) = 0
    exponent = torch.where(both_zero, 0, alpha * a + (1 - alpha) * b)
    s = torch.where(both_zero, 0, torch.exp(exponent)).sum(-1)
    return (1 - s) / (alpha * (1 - alpha))


def _mixed_logits(ref_hidden, ref_weight, ref_bias):
    """The reference side's raw logits: one (hidden, weight[, bias]) or a mixture
    ``sum_k c_k (h_k @ W_k.T + b_k)`` given as a list of (hidden, weight, coeff[, bias]),
    coeff a float or one value per row."""
    if isinstance(ref_hidden, torch.Tensor):
        return linear_logits(ref_hidden, ref_weight, ref_bias)
    total = None
    for hidden, weight, coeff, *bias in ref_hidden:
        raw = linear_logits(hidden, weight, bias[0] if bias else None)
        if isinstance(coeff, torch.Tensor):
            coeff = coeff.to(raw.dtype).unsqueeze(-1)
        total = raw * coeff if total is None else total + raw * coeff
    return total


def _finish(a, b, targets, div, ignore_index, return_logprobs):
    out = divergence_from_logprobs_ref(a, b, div)
    if targets is None:
        return (out, None) if return_logprobs else out
    valid = targets != ignore_index
    out = torch.where(valid, out, 0)
    if not return_logprobs:
        return out
    logp = a.gather(-1, torch.where(valid, targets, 0).long().unsqueeze(-1)).squeeze(-1)
    return out, torch.where(valid, logp, 0)


def linear_divergence_ref(hidden, weight, ref_hidden, ref_weight=None, targets=None, *,
                          kind="forward_kl", beta=0.5, alpha=0.5, temperature=1.0,
                          ignore_index=-100, bias=None, ref_bias=None, softcap=None,
                          logit_scale=None, ref_softcap=None, ref_logit_scale=None,
                          return_logprobs=False):
    """``z_p = head(hidden @ weight.T + bias)``, ``z_q = ref_head(ref_hidden @ ref_weight.T +
    ref_bias)`` (or the mixture, see _mixed_logits), both divided by ``temperature``, materialized
    in the compute dtype; -> per-row divergence of ``kind`` (module doc), 0 where ``targets`` is
    ignored; with ``return_logprobs`` also the policy's target log-probs."""
    div = resolve_kind(kind, beta, alpha)
    z_p = head_logits(linear_logits(hidden, weight, bias), temperature, logit_scale, softcap)
    raw_q = _mixed_logits(ref_hidden, ref_weight, ref_bias).to(z_p.dtype)
    z_q = head_logits(raw_q, temperature, ref_logit_scale, ref_softcap)
    return _finish(z_p.log_softmax(-1), z_q.log_softmax(-1), targets, div, ignore_index,
                   return_logprobs)


def logits_divergence_ref(logits, ref_logits, targets=None, *, kind="forward_kl", beta=0.5,
                          alpha=0.5, temperature=1.0, ignore_index=-100, return_logprobs=False):
    """``logits.float() / T`` against ``ref_logits.float() / T``: the divergence of
    :func:`linear_divergence_ref` when both logits already exist."""
    div = resolve_kind(kind, beta, alpha)
    cdt = torch.promote_types(compute_dtype(logits.dtype), compute_dtype(ref_logits.dtype))
    z_p = head_logits(logits.to(cdt), temperature)
    z_q = head_logits(ref_logits.to(cdt), temperature)
    return _finish(z_p.log_softmax(-1), z_q.log_softmax(-1), targets, div, ignore_index,
                   return_logprobs)
