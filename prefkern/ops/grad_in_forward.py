"""A loss value whose gradients the forward pass already computed: when a chunk of rows holds
everything its loss depends on (whole pairs, whole groups), d loss / d logits is known while the
chunk's logits are on hand, so dh and dW are formed there (3 GEMMs instead of the 4 of a
recomputing backward) and the backward only scales them by the incoming scalar."""

from __future__ import annotations

import torch


class GradientInForward(torch.autograd.Function):
    """value with the gradients already computed for (hidden, weight, bias): backward scales
    them by the incoming scalar."""

    @staticmethod
    def forward(ctx, value, dh, dw, db, hidden, weight, bias):
        ctx.save_for_backward(dh, dw, db)
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        scaled = [None if g is None else g * grad.to(g.dtype) for g in ctx.saved_tensors]
        return (None, None, None, None, *scaled)


def gradients_needed(hidden, weight, bias) -> tuple[bool, bool, bool]:
    """Which of (hidden, weight, bias) a gradient-in-forward pass must form: none under
    torch.no_grad() (evaluation), else those that require grad."""
    if not torch.is_grad_enabled():
        return False, False, False
    return (hidden.requires_grad, weight.requires_grad,
            bias is not None and bias.requires_grad)


def accumulator_fits(weight, budget_bytes: int | None, rows: int | None = None) -> bool:
    """Whether a gradient-in-forward pass may hold its fp32 (V, H) dW accumulator: needed for
    a half-precision weight (after autocast) that takes a gradient (the contract accumulates
    gradients in fp32 over the chunks of rows), 4VH bytes, e.g. 2 GiB at V=128256, H=4096.
    ``budget_bytes`` None: no limit. Above it, callers take the two-pass path (no accumulator:
    dW is complete per vocabulary slice there, at the cost of recomputing the logits).
    ``rows``: the V that decides (vocab-parallel callers pass the whole vocabulary, so that
    every rank takes the same path)."""
    if budget_bytes is None or not weight.requires_grad or not torch.is_grad_enabled():
        return True
    from prefkern._autocast import autocast_dtype

    dtype = weight.dtype
    if dtype in (torch.float16, torch.bfloat16, torch.float32):
        dtype = autocast_dtype(weight.device) or dtype  # what the head's GEMM will run in
    if dtype in (torch.float32, torch.float64):
        return True  # the accumulator is the gradient itself
    return 4 * (weight.shape[0] if rows is None else rows) * weight.shape[1] <= budget_bytes
