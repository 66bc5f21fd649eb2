"""Log-depth scans in plain torch for the backward recurrences of the advantage estimators."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def affine_suffix_scan(d: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``x_t = e_t + d_t * x_{t+1}`` along the last dim, with ``x_T = 0``.

    Hillis-Steele doubling: after the step with offset k, (d_t, e_t) is the composition of the
    maps t .. t+2k-1, so ceil(log2 T) steps of O(B T) elementwise work replace a T-step loop
    (one kernel launch per op, no host sync). Same math as the loop, summed in another order.
    """
    n = e.shape[-1]
    offset = 1
    while offset < n:
        e = e + d * F.pad(e[..., offset:], (0, offset))
        d = d * F.pad(d[..., offset:], (0, offset))
        offset *= 2
    return e


def reverse_cummin(x: torch.Tensor) -> torch.Tensor:
    """``out_t = min(x_t, ..., x_{T-1})`` along the last dim."""
    return torch.cummin(x.flip(-1), dim=-1).values.flip(-1)
