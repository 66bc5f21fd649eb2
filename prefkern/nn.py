"""nn.Module wrappers: they store options and call the functional API."""

from __future__ import annotations

import torch

from prefkern.ops.linear_logprobs import linear_logprobs


class LinearLogprobs(torch.nn.Module):
    """``module(hidden, weight, targets, bias=None)`` == ``prefkern.linear_logprobs(...)`` with the
    options given at construction."""

    def __init__(self, *, temperature: float = 1.0, ignore_index: int = -100,
                 softcap: float | None = None, return_entropy: bool = False,
                 return_lse: bool = False, mode: str = "auto", deterministic: bool = False,
                 backend: str | None = None):
        super().__init__()
        self.options = dict(temperature=temperature, ignore_index=ignore_index, softcap=softcap,
                            return_entropy=return_entropy, return_lse=return_lse, mode=mode,
                            deterministic=deterministic, backend=backend)

    def forward(self, hidden, weight, targets, bias=None):
        return linear_logprobs(hidden, weight, targets, bias, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class LinearDistillLoss(torch.nn.Module):
    """``module(hidden, weight, teacher_hidden, teacher_weight, labels, bias=None,
    teacher_bias=None, num_items_in_batch=None)`` == ``prefkern.losses.linear_distill_loss``
    with the options given at construction: the student's gradient is computed in the forward
    pass (4 GEMMs in all). Returns (loss, metrics)."""

    def __init__(self, *, kind: str = "jsd", beta: float = 0.5, alpha: float = 0.5,
                 temperature: float = 1.0, weight_soft_loss: float = 1.0,
                 weight_hard_loss: float = 0.0, reduction: str = "batchmean",
                 ignore_index: int = -100, softcap: float | None = None,
                 logit_scale: float | None = None, teacher_softcap: float | None = None,
                 teacher_logit_scale: float | None = None, backend: str | None = None):
        super().__init__()
        self.options = dict(kind=kind, beta=beta, alpha=alpha, temperature=temperature,
                            weight_soft_loss=weight_soft_loss, weight_hard_loss=weight_hard_loss,
                            reduction=reduction, ignore_index=ignore_index, softcap=softcap,
                            logit_scale=logit_scale, teacher_softcap=teacher_softcap,
                            teacher_logit_scale=teacher_logit_scale, backend=backend)

    def forward(self, hidden, weight, teacher_hidden, teacher_weight, labels, bias=None,
                teacher_bias=None, num_items_in_batch=None):
        from prefkern.losses.distill import linear_distill_loss

        return linear_distill_loss(hidden, weight, teacher_hidden, teacher_weight, labels,
                                   bias=bias, teacher_bias=teacher_bias,
                                   num_items_in_batch=num_items_in_batch, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class LinearPreferenceLoss(torch.nn.Module):
    """``module(hidden, weight, targets, cu_seqlens=None, bias=None, ref_logps=None,
    ref_hidden=None, ref_weight=None, ref_bias=None)`` ==
    ``prefkern.losses.linear_preference_loss`` with the options given at construction
    (family, loss_type, beta, ... and the head options). Returns (loss, metrics)."""

    def __init__(self, family: str = "dpo", **options):
        super().__init__()
        self.options = dict(family=family, **options)

    def forward(self, hidden, weight, targets, cu_seqlens=None, bias=None, ref_logps=None,
                ref_hidden=None, ref_weight=None, ref_bias=None):
        from prefkern.losses.linear_preference import linear_preference_loss

        return linear_preference_loss(hidden, weight, targets, cu_seqlens=cu_seqlens, bias=bias,
                                      ref_logps=ref_logps, ref_hidden=ref_hidden,
                                      ref_weight=ref_weight, ref_bias=ref_bias, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class LinearPolicyLoss(torch.nn.Module):
    """``module(hidden, weight, targets, old_logprobs, advantages, mask=None, bias=None,
    **per_call)`` == ``prefkern.losses.linear_policy_loss`` with the options given at
    construction (loss_type, eps_low, agg, kl and entropy settings, head options). Per-call
    keywords (ref_logprobs, is_weights, normalizer) override. Returns (loss, metrics)."""

    def __init__(self, **options):
        super().__init__()
        self.options = options

    def forward(self, hidden, weight, targets, old_logprobs, advantages, mask=None, bias=None,
                **per_call):
        from prefkern.losses.policy import linear_policy_loss

        return linear_policy_loss(hidden, weight, targets, old_logprobs, advantages, mask=mask,
                                  bias=bias, **{**self.options, **per_call})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
