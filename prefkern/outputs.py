"""Named outputs of the log-prob ops."""

from __future__ import annotations

from typing import NamedTuple

import torch


class LogprobsEntropy(NamedTuple):
    """Per-token log-prob of the target (None without targets) and entropy, both fp32."""

    logprobs: torch.Tensor | None
    entropy: torch.Tensor


class LinearLogprobsOutput(NamedTuple):
    """fp32 per-token outputs of linear_logprobs; fields not asked for are None."""

    logprobs: torch.Tensor | None
    entropy: torch.Tensor | None
    lse: torch.Tensor | None


class DivergenceOutput(NamedTuple):
    """Per-token divergence and the policy's target log-probs (None without targets), fp32."""

    divergence: torch.Tensor
    logprobs: torch.Tensor | None
