"""One autocast policy for every op, the same in forward and backward.

- At the API boundary an op decides what autocast means for it (linear_logprobs: the LM-head
  GEMM is autocast's "lower precision" class, so hidden/weight/bias are cast to the autocast
  dtype; the log-softmax ops compute in fp32 whatever the input dtype, so they cast nothing).
- Inside, every pass runs with autocast disabled, so nested torch GEMMs never see the caller's
  autocast state: the backward computes the gradient of the function the forward computed,
  whether it runs inside the autocast region or outside it (the autograd engine's threads).
"""

from __future__ import annotations

import torch


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast would give a GEMM on ``device`` now, or None when it is off."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def without_autocast(tensor: torch.Tensor):
    """Context: autocast off on ``tensor``'s device (for the body of every pass)."""
    return torch.autocast(tensor.device.type, enabled=False)
