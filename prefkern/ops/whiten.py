"""Masked whitening of advantages (verl's ``masked_whiten``), optionally over a process group."""

from __future__ import annotations

import torch

WHITEN_EPS = 1e-8


def masked_moments(x: torch.Tensor, mask: torch.Tensor | None = None, process_group=None):
    """-> (count, sum, sum of squares) of x over ``mask != 0`` (all when mask is None), as
    float64 0-d tensors, all-reduced over ``process_group`` when given. No host sync."""
    x = x.to(torch.float64)
    if mask is not None:
        keep = mask != 0
        x = torch.where(keep, x, 0.0)
        count = keep.sum(dtype=torch.float64)
    else:
        count = torch.full((), float(x.numel()), dtype=torch.float64, device=x.device)
    stats = torch.stack([count, x.sum(), (x * x).sum()])
    if process_group is not None:
        import torch.distributed as dist

        dist.all_reduce(stats, group=process_group)
    return stats.unbind()


def masked_whiten(values: torch.Tensor, mask: torch.Tensor | None = None, *,
                  process_group=None) -> torch.Tensor:
    """``(values - mean) * rsqrt(var + 1e-8)`` at every position, where mean and the unbiased
    variance are taken over ``mask != 0`` (all positions when ``mask`` is None).

    With ``process_group`` the float64 (sum, sum of squares, count) are all-reduced over it
    first, so every rank whitens with the global statistics. See
    :func:`prefkern.reference.advantages.masked_whiten_ref`; fewer than 2 masked values give
    var = 0 instead of verl's error. No host sync.
    """
    n, total, total_sq = masked_moments(values.to(torch.float64), mask, process_group)
    mean = torch.where(n > 0, total / n.clamp(min=1), 0.0)
    var = torch.where(n > 1, (total_sq - total * mean) / (n - 1).clamp(min=1), 0.0).clamp(min=0)
    scale = torch.rsqrt(var + WHITEN_EPS)
    return (values - mean.to(values.dtype)) * scale.to(values.dtype)
