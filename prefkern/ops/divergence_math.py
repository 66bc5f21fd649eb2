"""Divergence terms and their closed-form gradients on log-probs, in torch (the torch engine of
linear_divergence and logits_divergence; the Triton kernels implement the same algebra).

Every kind (see prefkern.reference.divergence) is D = sum_v term_v, and its gradients with
respect to the policy logits z_p and the reference logits z_q have the softmax-Jacobian form

    dD/dz_p = f_p - p * sum(f_p)        dD/dz_q = f_q - q * sum(f_q)

with f_p = p * dD/dp and f_q = q * dD/dq (element by element, p and q taken as free):

    kind        term                          f_p                    f_q
    forward_kl  q (b - a)                     p - q                  q (b - a)
    reverse_kl  p (a - b)                     p (a - b)              q - p
    jsd         beta tq + (1 - beta) tp       (1 - beta) tp          beta tq
                tp = p (a - log m), tq = q (b - log m),
                log m = logaddexp(a + log(1 - beta), b + log(beta))
    tv          |p - q| / 2                   p sign(p - q) / 2      -q sign(p - q) / 2
    alpha       (p - w) / (alpha (1-alpha))   -w / (1 - alpha)       -w / alpha
                w = exp(alpha a + (1 - alpha) b)

So a forward over whole rows keeps, per row, D, c_p = sum f_p and c_q = sum f_q, and the
backward is elementwise on any vocabulary slice given lse_p, lse_q, c_p and c_q.
"""

from __future__ import annotations

import math

import torch

from prefkern.reference.divergence import Divergence


def _weighted(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """weight * x, 0 where weight is 0 (0 log 0 = 0 at -inf logits)."""
    return torch.where(weight == 0, 0, weight * x)


def _alpha_weight(a, b, alpha: float) -> torch.Tensor:
    """p^alpha q^(1 - alpha) = exp(alpha a + (1 - alpha) b), 0 where both p and q are 0 (for
    alpha outside [0, 1] the exponent would be inf - inf there)."""
    both_zero = torch.isneginf(a) & torch.isneginf(b)
    exponent = torch.where(both_zero, 0, alpha * a + (1 - alpha) * b)
    return torch.where(both_zero, 0, torch.exp(exponent))


def terms(a: torch.Tensor, b: torch.Tensor, div: Divergence, need_q: bool):
    """a, b (n, C) log-probs -> (term, f_p, f_q or None), each (n, C) (table in module doc)."""
    p, q = a.exp(), b.exp()
    if div.kind == "forward_kl":
        term = _weighted(q, b - a)
        return term, p - q, term if need_q else None
    if div.kind == "reverse_kl":
        term = _weighted(p, a - b)
        return term, term, (q - p) if need_q else None
    if div.kind == "tv":
        half_sign = torch.sign(p - q) * 0.5
        return (p - q).abs_().mul_(0.5), p * half_sign, (-q * half_sign) if need_q else None
    if div.kind == "jsd":
        beta = div.beta
        log_m = torch.logaddexp(a + math.log1p(-beta), b + math.log(beta))
        tp, tq = _weighted(p, a - log_m), _weighted(q, b - log_m)
        f_p, f_q = tp.mul_(1 - beta), tq.mul_(beta)
        return f_p + f_q, f_p, f_q if need_q else None
    alpha = div.alpha
    w = _alpha_weight(a, b, alpha)
    term = (p - w) / (alpha * (1 - alpha))
    return term, w / (alpha - 1), (w / -alpha) if need_q else None


def row_values(a, b, div: Divergence, need_q: bool):
    """Whole rows: -> (D, c_p, c_q or None), each (n,)."""
    term, f_p, f_q = terms(a, b, div, need_q)
    return term.sum(-1), f_p.sum(-1), None if f_q is None else f_q.sum(-1)


def grads(a, b, c_p, c_q, div: Divergence, need_q: bool):
    """Any vocabulary slice: -> (dD/dz_p, dD/dz_q or None) per unit upstream gradient, from
    the rows' (n,) constants c_p = sum f_p, c_q = sum f_q. Written p * (g - c) with
    g = f / p bounded where that is possible: when the gradient is small against p (a dominant
    token), p * g - p * c would lose it to the rounding of two large products."""
    p, q = a.exp(), b.exp()
    c_p, c_q = c_p[:, None], (None if c_q is None else c_q[:, None])
    kind = div.kind
    if kind == "alpha":
        _, f_p, f_q = terms(a, b, div, need_q)  # (p, q recomputed there)
        return (f_p.sub_(p.mul_(c_p)),
                f_q.sub_(q.mul_(c_q)) if need_q else None)
    if kind == "forward_kl":  # sum f_p = sum (p - q) = 0 exactly
        return p - q, _weighted(q, (b - a).sub_(c_q)) if need_q else None
    if kind == "reverse_kl":
        return _weighted(p, (a - b).sub_(c_p)), (q - p) if need_q else None
    if kind == "tv":
        half_sign = torch.sign(p - q).mul_(0.5)
        return (p * (half_sign - c_p),
                q.mul_(half_sign.neg_().sub_(c_q)) if need_q else None)
    beta = div.beta  # jsd
    log_m = torch.logaddexp(a + math.log1p(-beta), b + math.log(beta))
    d_p = _weighted(p, (a - log_m).mul_(1 - beta).sub_(c_p))
    d_q = _weighted(q, (b - log_m).mul_(beta).sub_(c_q)) if need_q else None
    return d_p, d_q
