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


class HeadStats(NamedTuple):
    """Per-row softmax statistics (``return_stats``), 0 on rows whose targets are all ignored.

    sum_p2: ``(p * p).sum(-1)`` fp32, differentiable. mean_logit: ``z.mean(-1)`` fp32,
    differentiable (z: the logits after scale, softcap and temperature). target_is_argmax:
    ``z.argmax(-1) == y`` (the first maximal column on ties, as torch.argmax; TRL's token
    accuracy), bool shaped like the targets, None without targets."""

    sum_p2: torch.Tensor
    mean_logit: torch.Tensor
    target_is_argmax: torch.Tensor | None


class HeadOutput(NamedTuple):
    """What a log-prob op returns with ``return_stats``; fields not asked for are None."""

    logprobs: torch.Tensor | None
    entropy: torch.Tensor | None
    lse: torch.Tensor | None
    stats: HeadStats
