"""A loss value whose gradients the forward pass already computed (DESIGN: gradient in the
forward pass): the backward only scales them by the incoming scalar."""

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
