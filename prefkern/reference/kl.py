"""Reference KL estimators: each kind written out on x = logprobs - ref_logprobs."""

from __future__ import annotations

import torch


def kl_estimate_ref(logprobs, ref_logprobs, kind="k3", *, input_clamp=20.0, output_clamp="auto"):
    """k1 = x, abs = |x|, k2 = x^2 / 2, k3 = exp(-x) + x - 1 with -x clamped to
    [-input_clamp, input_clamp]; the result clamped to [-output_clamp, output_clamp] ("auto": 10
    for k3 only); "kind+" has the value of kind and the gradient of k2. Math in the inputs'
    promoted dtype (at least fp32)."""
    dtype = torch.promote_types(torch.promote_types(logprobs.dtype, ref_logprobs.dtype),
                                torch.float32)
    x = logprobs.to(dtype) - ref_logprobs.to(dtype)
    st = kind.endswith("+")
    name = kind.rstrip("+")
    if name in ("k1", "kl"):
        value = x
    elif name == "abs":
        value = torch.abs(x)
    elif name in ("k2", "mse"):
        value = x * x / 2
    elif name in ("k3", "low_var_kl"):
        neg = -x if input_clamp is None else torch.clamp(-x, min=-input_clamp, max=input_clamp)
        value = torch.exp(neg) - neg - 1
    else:
        raise ValueError(kind)
    if output_clamp == "auto":
        output_clamp = 10.0 if name in ("k3", "low_var_kl") else None
    if output_clamp is not None:
        value = torch.clamp(value, min=-output_clamp, max=output_clamp)
    if st:
        return x * x / 2 - (x * x / 2).detach() + value.detach()
    return value
