"""Test helpers around the comparison rule (defined in prefkern.testing, shared with the bench)."""

from __future__ import annotations

import torch

from prefkern.testing import assert_rule, rule_bound, rule_error  # noqa: F401


def leaf(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A fresh leaf copy (optionally cast) that requires grad."""
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(True)
