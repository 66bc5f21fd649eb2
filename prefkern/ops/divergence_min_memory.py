"""The min_memory passes of linear_divergence (Triton): fused kernels compute both heads' logit
tiles on chip (prefkern._kernels.divergence_fused); nothing of size (N, V) or (N, C) exists.
Peak extra memory: the per-split row partials (7 x splits x N fp32) forward, fp32 gradient
scratches of at most SCRATCH_BYTES per wave backward.

Forward: one pass for forward_kl, reverse_kl and alpha (their sums need only each side's
running max), two for jsd and tv; the rows' D, c_p, c_q then follow from the merged partials
(formulas in the kernels' module docstring). Backward: the dh and the dW pass each recompute
both sides' tiles. One reference head (a mixture runs in fast mode).
"""

from __future__ import annotations

import torch

from prefkern.ops import softmax_stats
from prefkern.ops.divergence_passes import HeadArgs
from prefkern.reference.divergence import Divergence


def _kernels():
    from prefkern._kernels import divergence_fused

    return divergence_fused


def _single_ref(refs):
    if len(refs) != 1 or refs[0].coeff is not None:
        raise ValueError("mode='min_memory' takes one reference head, not a mixture")
    return refs[0][:3]


def _head(head: HeadArgs):
    return head.factor, head.softcap


def _row_values(part, div: Divergence):
    """Merged partials -> (D, m_p, log s_p, m_q, log s_q, z_p[y]) for the one-pass kinds;
    alpha's D is log sum p^alpha q^(1 - alpha) (finished by the caller); None for jsd / tv.
    Each split's t is relative to that split's maxima: it moves to the merged ones as in
    the kernel's fold (module doc of prefkern._kernels.divergence_fused)."""
    m_p, s_p = softmax_stats.merge_scaled_along(part[0], part[1])
    m_q, s_q = softmax_stats.merge_scaled_along(part[2], part[3])
    d_p, d_q = m_p - part[0], m_q - part[2]  # >= 0, finite: every split holds a column
    ls_p, ls_q = s_p.log(), s_q.log()
    d = None
    if div.kind == "forward_kl":
        t = (torch.exp(-d_q) * (part[5] + part[3] * (d_p - d_q))).sum(0)
        d = t / s_q + (ls_p - ls_q)
    elif div.kind == "reverse_kl":
        t = (torch.exp(-d_p) * (part[5] + part[1] * (d_q - d_p))).sum(0)
        d = t / s_p + (ls_q - ls_p)
    elif div.kind == "alpha":
        alpha = div.alpha
        m_t, t = softmax_stats.merge_scaled_along(
            part[4] - (alpha * d_p + (1 - alpha) * d_q), part[5])
        d = m_t + t.log() - alpha * ls_p - (1 - alpha) * ls_q
    return d, m_p, ls_p, m_q, ls_q, part[6].sum(0)


def forward(policy, refs, targets, head_p: HeadArgs, head_q: HeadArgs, div: Divergence,
            ignore_index: int, need_q: bool):
    """The contract of divergence_passes.forward: -> [D, logp, m_p, log_s_p, m_q, log_s_q,
    c_p, c_q], each (N,) fp32, 0 on ignored rows."""
    k = _kernels()
    ref = _single_ref(refs)
    side_p = tuple(policy[:3])
    part = k.divergence_partials(side_p, ref, targets, _head(head_p), _head(head_q), div.kind,
                                 div.alpha, ignore_index)
    d, m_p, ls_p, m_q, ls_q, z_y = _row_values(part, div)
    zero = torch.zeros_like(m_p)
    if div.kind == "forward_kl":  # f_p = p - q sums to 0, f_q = the term
        c_p, c_q = zero, d
    elif div.kind == "reverse_kl":
        c_p, c_q = d, zero
    elif div.kind == "alpha":
        alpha = div.alpha
        w_sum = d.exp()
        c_p, c_q = w_sum / (alpha - 1), w_sum / -alpha
        d = torch.expm1(d).neg_().div_(alpha * (1 - alpha))  # (1 - sum w) without cancelling
    else:  # jsd, tv: a second pass with both log-softmaxes
        terms = torch.stack([m_p, ls_p, m_q, ls_q, zero, zero, zero, zero])  # (the kernel
        # reads the backward's layout of row terms)
        sums = k.divergence_sums(side_p, ref, targets, terms, _head(head_p), _head(head_q),
                                 div.kind, div.beta, div.alpha, ignore_index).sum(1)
        d, c_p, c_q = sums.unbind(0)
    valid = targets != ignore_index
    logp = (z_y - m_p) - ls_p
    return [torch.where(valid, x, zero) for x in (d, logp, m_p, ls_p, m_q, ls_q, c_p, c_q)]


def backward(policy, refs, targets, head_p: HeadArgs, head_q: HeadArgs, div: Divergence,
             ignore_index: int, stats, g_div, g_logp, need_p, need_ref: bool,
             fp32_dh: bool = False, deterministic: bool = False):
    """The contract of divergence_passes.backward; ``deterministic``: no atomics."""
    ref = _single_ref(refs)
    zero = torch.zeros_like(stats[0])
    terms = torch.stack([*stats, zero if g_div is None else g_div,
                         zero if g_logp is None else g_logp]).contiguous()
    grads = _kernels().divergence_bwd(
        tuple(policy[:3]), ref, targets, terms, _head(head_p), _head(head_q), div.kind,
        div.beta, div.alpha, ignore_index, need_p, need_ref, g_div is not None,
        g_logp is not None, fp32_dh=fp32_dh, deterministic=deterministic)
    return grads[:3] + (grads[3:] if need_ref else [])
