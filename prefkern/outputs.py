"""Named outputs of the log-prob ops."""

from __future__ import annotations

from typing import NamedTuple

import torch


class LogprobsEntropy(NamedTuple):
    """Per-token log-prob of the target and entropy of the distribution, both fp32."""

    logprobs: torch.Tensor
    entropy: torch.Tensor


class LinearLogprobsOutput(NamedTuple):
    """fp32 per-token outputs of linear_logprobs; fields not asked for are None."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None
    lse: torch.Tensor | None
