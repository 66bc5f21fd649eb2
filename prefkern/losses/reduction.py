"""Token reductions shared by every loss: no host sync, normalizers as tensors or numbers."""

from __future__ import annotations

import torch
from torch import Tensor

REDUCTIONS = ("batchmean", "mean", "sum", "none")


def reduce_tokens(per_token: Tensor, mask: Tensor, reduction: str = "batchmean",
                  normalizer: float | Tensor | None = None) -> Tensor:
    """Reduce ``per_token`` (...) over the tokens where ``mask`` (bool, same shape) holds.

    ``normalizer`` given: ``(per_token * mask).sum() / normalizer`` whatever ``reduction`` says
    (TRL's ``num_items_in_batch``: a token count spanning gradient accumulation or ranks, so
    that the micro-batch losses add up to the batch mean). Otherwise:
      batchmean, mean  ``sum / max(mask.sum(), 1)`` (TRL GKD's batchmean over valid tokens)
      sum              ``(per_token * mask).sum()``
      none             ``per_token * mask``
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    masked = torch.where(mask, per_token, 0)
    if reduction == "none":
        return masked
    total = masked.sum()
    if normalizer is not None:
        return total / normalizer
    if reduction == "sum":
        return total
    return total / mask.sum().clamp(min=1).to(total.dtype)
