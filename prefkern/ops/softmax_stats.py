"""Softmax statistics in torch: the one place Python code computes, merges and finishes them.

Statistics of a set of logits z are (m, s, u): m = max z, s = sum exp(z - m),
u = sum exp(z - m) * (z - m). Then lse = m + log s and entropy = log s - u / s; keeping u
relative to m avoids the cancellation of lse - sum(p z) when |z| is large. The Triton kernels
use the same algebra (prefkern._kernels.softmax_stats).
"""

from __future__ import annotations

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
    e = centered.exp()
    s = e.sum(-1)
    u = e.mul_(centered).sum(-1) if with_u else None
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


def merge_along(m, s, u, dim: int = 0):
    """Merge statistics stacked along ``dim`` (e.g. vocab splits of one kernel launch)."""
    m_all = m.amax(dim)
    m_safe = _safe(m_all).unsqueeze(dim)
    w = torch.exp(m - m_safe)
    shift = torch.where(torch.isinf(m), torch.zeros_like(m), m - m_safe)
    return m_all, (s * w).sum(dim), (w * (u + s * shift)).sum(dim)


def finish(m, s, u, z_target, valid):
    """-> (logp, entropy or None, lse), 0 where not valid: lse = m + log s,
    logp = z[y] - lse, entropy = log s - u / s."""
    log_s = torch.log(s)
    lse = m + log_s
    zero = torch.zeros_like(lse)
    entropy = None if u is None else torch.where(valid, log_s - u / s, zero)
    return torch.where(valid, z_target - lse, zero), entropy, torch.where(valid, lse, zero)


class RunningStats:
    """Online statistics per token across vocab chunks, plus z[y] picked from whichever chunk
    holds the target."""

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device, with_u: bool = True):
        self.m = torch.full((n,), -float("inf"), dtype=dtype, device=device)
        self.s = torch.zeros(n, dtype=dtype, device=device)
        self.u = torch.zeros(n, dtype=dtype, device=device) if with_u else None
        self.z_target = torch.zeros(n, dtype=dtype, device=device)

    def update(self, rows: slice, z: torch.Tensor, col0: int, y: torch.Tensor) -> None:
        """Fold the chunk z (rows, columns col0..col0+C) into the state of ``rows``."""
        chunk = row_stats(z, self.u is not None)
        u_old = None if self.u is None else self.u[rows]
        m, s, u = merge(self.m[rows], self.s[rows], u_old, *chunk)
        self.m[rows], self.s[rows] = m, s
        if u is not None:
            self.u[rows] = u
        hit, picked = pick_target(z, y - col0)
        self.z_target[rows] = torch.where(hit, picked, self.z_target[rows])

    def finish(self, valid: torch.Tensor):
        return finish(self.m, self.s, self.u, self.z_target, valid)


def pick_target(z: torch.Tensor, local_y: torch.Tensor):
    """-> (hit, z[row, local_y]) for target columns local to the chunk z (n, C); rows whose
    target lies outside the chunk read column 0 and have hit False."""
    hit = (local_y >= 0) & (local_y < z.shape[-1])
    picked = z.gather(-1, torch.where(hit, local_y, 0).long().unsqueeze(-1)).squeeze(-1)
    return hit, picked
