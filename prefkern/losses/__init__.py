"""Losses on top of the primitives: cheap functions of per-token log-probs and divergences
that never re-implement the log-prob math. Each returns (loss, metrics), metrics detached."""

from prefkern.losses.distill import distill_loss, linear_distill_loss, topk_forward_kl
from prefkern.losses.reduction import REDUCTIONS, reduce_tokens

__all__ = ["REDUCTIONS", "distill_loss", "linear_distill_loss", "reduce_tokens",
           "topk_forward_kl"]
