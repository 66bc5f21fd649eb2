"""Softmax statistics in torch: the one place Python code computes, merges and finishes them.

Statistics of a set of logits z are (m, s, u): m = max z, s = sum exp(z - m),
u = sum exp(z - m) * (z - m). Then lse = m + log s and entropy = log s - u / s; keeping u
relative to m avoids the cancellation of lse - sum(p z) when |z| is large. The Triton kernels
use the same algebra (prefkern._kernels.softmax_stats).

Extra row statistics (``return_stats``) add (s2, sz, idx): s2 = sum exp(2 (z - m)), sz = sum z,
idx the first column holding m. Then sum_p2 = s2 / s^2, mean_logit = sz / V, and a target is
the argmax when it equals idx (torch.argmax's first-index rule, as in token accuracy). Gradients:
d sum_p2 / dz = 2 p (p - sum_p2), d mean_logit / dz = 1 / V.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# exp(-1e4) == 0 in fp32 and fp64: clamping z - m (or log p) there changes no probability and
# keeps 0 * log 0 terms at 0 instead of 0 * -inf = nan
LOG_FLOOR = -1e4


def _safe(m: torch.Tensor) -> torch.Tensor:
    """m with -inf (a row with no finite logit yet) replaced by 0, so z - m stays finite."""
    return torch.where(torch.isinf(m), torch.zeros_like(m), m)


def row_stats(z: torch.Tensor, with_u: bool = True):
    """(m, s, u or None) over the last dim of z (..., C); z is not modified."""
    m = z.amax(dim=-1)
    centered = (z - _safe(m).unsqueeze(-1)).clamp_(min=LOG_FLOOR)
    if not with_u:  # one (..., C) temporary instead of two
        return m, centered.exp_().sum(-1), None
    e = centered.exp()
    s = e.sum(-1)
    u = e.mul_(centered).sum(-1)
    return m, s, u


def merge(m_a, s_a, u_a, m_b, s_b, u_b):
    """Statistics of the union of two sets (u_a / u_b may both be None)."""
    m = torch.maximum(m_a, m_b)
    m_safe = _safe(m)
    w_a, w_b = torch.exp(m_a - m_safe), torch.exp(m_b - m_safe)
    s = s_a * w_a + s_b * w_b
    if u_a is None:
        return m, s, None
    shift_a = torch.where(torch.isinf(m_a), torch.zeros_like(m_a), m_a - m_safe)
    shift_b = torch.where(torch.isinf(m_b), torch.zeros_like(m_b), m_b - m_safe)
    return m, s, w_a * (u_a + s_a * shift_a) + w_b * (u_b + s_b * shift_b)


def extra_stats(z: torch.Tensor, m: torch.Tensor):
    """(s2, sz, idx) of z (..., C) with max m (...,): sum exp(2 (z - m)), sum z, and the first
    column holding the max (as z's dtype)."""
    e = (z - _safe(m).unsqueeze(-1)).clamp_(min=LOG_FLOOR).exp_()
    return e.mul_(e).sum(-1), z.sum(-1), z.argmax(-1).to(z.dtype)


def merge_extra(m_a, s2_a, sz_a, idx_a, m_b, s2_b, sz_b, idx_b):
    """(s2, sz, idx) of the union of two sets with maxima m_a, m_b (s2 rescaled to the larger;
    the b columns come after the a columns, so a tie keeps idx_a)."""
    m_safe = _safe(torch.maximum(m_a, m_b))
    return (s2_a * torch.exp(2 * (m_a - m_safe)) + s2_b * torch.exp(2 * (m_b - m_safe)),
            sz_a + sz_b, torch.where(m_b > m_a, idx_b, idx_a))


def merge_extra_along(m, s2, sz, idx, dim: int = 0):
    """merge_extra for statistics stacked along ``dim`` in column order."""
    m_all = m.amax(dim, keepdim=True)
    m_safe = _safe(m_all)
    first = torch.where(m == m_all, idx, float("inf")).amin(dim)
    return (s2 * torch.exp(2 * (m - m_safe))).sum(dim), sz.sum(dim), first


def finish_extra(m, s, s2, sz, idx, valid, vocab: int):
    """-> (N, 4) [sum_p2, mean_logit, max_logit, first argmax column], 0 (-1 for the column)
    where not valid: sum_p2 = s2 / s^2, mean = sz / V, max = m."""
    cols = (s2 / (s * s), sz / vocab, m)
    return torch.stack([torch.where(valid, c, 0) for c in cols]
                       + [torch.where(valid, idx.to(m.dtype), -1)], dim=-1)


def target_hits(stats, targets, ignore_index: int):
    """Whether each target id (N,) or (N, K) is its row's argmax (first max column)."""
    idx = stats[:, 3].long()
    idx = idx if targets.dim() == 1 else idx.unsqueeze(-1)
    return (targets == idx) & (targets != ignore_index)


def extra_gradients(stats, g_stats, g_lse, vocab: int):
    """Upstream gradients of the stats (N, 4), of which sum_p2 and mean_logit have gradients,
    -> (g_lse for the backends, (N, 2) fp32 [g_sq, g_const]): the backends add
    ``g_sq * p^2 + g_const`` to the logits' gradient. From
    2 g_p2 p (p - sum_p2) + g_mean / V = (2 g_p2) p^2 - (2 g_p2 sum_p2) p + g_mean / V, the p
    term joins the lse gradient (``+ g_lse * p``)."""
    g_sq = 2 * g_stats[:, 0]
    shifted = -g_sq * stats[:, 0]
    g_lse = shifted if g_lse is None else g_lse + shifted
    return g_lse, torch.stack([g_sq, g_stats[:, 1] / vocab], dim=-1).contiguous()


def merge_along(m, s, u, dim: int = 0):
    """Merge statistics stacked along ``dim`` (e.g. vocab splits of one kernel launch)."""
    m_all = m.amax(dim)
    m_safe = _safe(m_all).unsqueeze(dim)
    w = torch.exp(m - m_safe)
    shift = torch.where(torch.isinf(m), torch.zeros_like(m), m - m_safe)
    return m_all, (s * w).sum(dim), (w * (u + s * shift)).sum(dim)


def merge_scaled_along(m, *sums, dim: int = 0):
    """Merge sums that scale with exp(z - m) (s, or sum exp(z - m) x for an x not relative
    to m) stacked along ``dim`` -> (max, each sum rescaled to it and added)."""
    m_all = m.amax(dim)
    w = torch.exp(m - _safe(m_all).unsqueeze(dim))
    return (m_all, *((x * w).sum(dim) for x in sums))


def finish(m, s, u, z_target, valid):
    """-> (logp, entropy or None, lse), 0 where not valid: lse = m + log s,
    logp = z[y] - lse, entropy = log s - u / s."""
    log_s = torch.log(s)
    lse = m + log_s
    zero = torch.zeros_like(lse)
    entropy = None if u is None else torch.where(valid, log_s - u / s, zero)
    return torch.where(valid, z_target - lse, zero), entropy, torch.where(valid, lse, zero)


class RawStats(NamedTuple):
    """Unfinished per-row statistics of a set of columns: (m, s, u) as above, z[y] (0 where the
    target is not among the columns), and (s2, sz, idx) for return_stats or None. Two sets of
    columns merge (merge_along / merge_extra_along), then finish_raw."""

    m: torch.Tensor
    s: torch.Tensor
    u: torch.Tensor | None
    z_target: torch.Tensor
    extra: tuple | None


def finish_raw(raw: RawStats, valid: torch.Tensor, vocab: int):
    """-> (logp, entropy or None, lse, (N, 4) extra statistics or None)."""
    stats = None
    if raw.extra is not None:
        stats = finish_extra(raw.m, raw.s, *raw.extra, valid, vocab)
    return (*finish(raw.m, raw.s, raw.u, raw.z_target, valid), stats)


class RunningStats:
    """Online statistics per token across vocab chunks, plus z[y] picked from whichever chunk
    holds the target (and the extra statistics (s2, sz) with ``with_extra``)."""

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device, with_u: bool = True,
                 with_extra: bool = False):
        self.m = torch.full((n,), -float("inf"), dtype=dtype, device=device)
        self.s = torch.zeros(n, dtype=dtype, device=device)
        self.u = torch.zeros(n, dtype=dtype, device=device) if with_u else None
        self.z_target = torch.zeros(n, dtype=dtype, device=device)
        self.extra = [torch.zeros(n, dtype=dtype, device=device) for _ in range(3)] \
            if with_extra else None  # s2, sz, idx
        self.vocab = 0

    def update(self, rows: slice, z: torch.Tensor, col0: int, y: torch.Tensor) -> None:
        """Fold the chunk z (rows, columns col0..col0+C) into the state of ``rows``."""
        chunk = row_stats(z, self.u is not None)
        m_old = self.m[rows]
        if self.extra is not None:
            s2, sz, idx = extra_stats(z, chunk[0])
            merged = merge_extra(m_old, *(e[rows] for e in self.extra), chunk[0], s2, sz,
                                 idx + col0)
            for acc, value in zip(self.extra, merged, strict=True):
                acc[rows] = value
            self.vocab = max(self.vocab, col0 + z.shape[-1])
        u_old = None if self.u is None else self.u[rows]
        m, s, u = merge(m_old, self.s[rows], u_old, *chunk)
        self.m[rows], self.s[rows] = m, s
        if u is not None:
            self.u[rows] = u
        hit, picked = pick_target(z, y - col0)
        self.z_target[rows] = torch.where(hit, picked, self.z_target[rows])

    def raw(self) -> RawStats:
        return RawStats(self.m, self.s, self.u, self.z_target,
                        None if self.extra is None else tuple(self.extra))


def pick_target(z: torch.Tensor, local_y: torch.Tensor):
    """-> (hit, z[row, local_y]) for target columns local to the chunk z (n, C); rows whose
    target lies outside the chunk read column 0 and have hit False."""
    hit = (local_y >= 0) & (local_y < z.shape[-1])
    picked = z.gather(-1, torch.where(hit, local_y, 0).long().unsqueeze(-1)).squeeze(-1)
    return hit, picked
