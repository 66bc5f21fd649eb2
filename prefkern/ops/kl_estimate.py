"""Per-token KL estimators from two log-probs of the sampled token (Schulman's k1/k2/k3).

With x = logprobs - ref_logprobs (the policy's log-ratio over the reference):
    k1  x                       abs  |x|
    k2  x^2 / 2                 k3   exp(u) - u - 1, u = -x   (low variance, >= 0)
"kind+" (straight-through): the value of ``kind`` with the gradient of k2:
    k2 - k2.detach() + value.detach().
The trainers differ only in clamps (read from their source):
    verl (1dda039b, core_algos.kl_penalty)    u clamped to [-20, 20] and k3 to [-10, 10];
                                              k1, abs, k2 unclamped
    OpenRLHF 0.11.0 (compute_approx_kl)       every estimator, k1 included, clamped to
                                              [-10, 10]; no input clamp
    TRL (GRPO k3)                             no clamp
which are, in this function's arguments:
    verl      input_clamp=20.0, output_clamp="auto"   (the defaults)
    OpenRLHF  input_clamp=None, output_clamp=10.0
    TRL       input_clamp=None, output_clamp=None
A clamp stops the gradient where it is active, as torch.clamp does in the trainers.
"""

from __future__ import annotations

import torch

from prefkern import _checks
from prefkern.reference.logprobs import compute_dtype

KINDS = {"k1": "k1", "kl": "k1", "abs": "abs", "k2": "k2", "mse": "k2", "k3": "k3",
         "low_var_kl": "k3"}
AUTO_OUTPUT_CLAMP = {"k3": 10.0}  # verl clamps its low-variance estimator only


def _estimator(base: str, x: torch.Tensor, input_clamp: float | None) -> torch.Tensor:
    if base == "k1":
        return x
    if base == "abs":
        return x.abs()
    if base == "k2":
        return 0.5 * x.square()
    u = -x
    if input_clamp is not None:
        u = u.clamp(-input_clamp, input_clamp)
    return u.exp() - u - 1


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k3", *,
                input_clamp: float | None = 20.0,
                output_clamp: float | str | None = "auto") -> torch.Tensor:
    """Per-token KL estimate of the policy against the reference, fp32 (fp64 for fp64 inputs).

    ``x = logprobs.float() - ref_logprobs.float()``; kinds ``k1``/``kl``, ``abs``,
    ``k2``/``mse``, ``k3``/``low_var_kl`` and each with a ``+`` suffix (value of the estimator,
    gradient of k2). ``input_clamp`` bounds k3's exponent ``u = -x`` to [-c, c];
    ``output_clamp`` bounds the result to [-c, c]: a float for every kind, None for none, or
    "auto" (verl: 10 for k3, nothing for the others). The module docstring lists the settings
    that reproduce verl, OpenRLHF and TRL. Differentiable in both inputs.
    """
    _checks.check_float("logprobs", logprobs)
    _checks.check_float("ref_logprobs", ref_logprobs)
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and ref_logprobs "
                         f"{tuple(ref_logprobs.shape)} must have one shape")
    _checks.check_same_device(logprobs=logprobs, ref_logprobs=ref_logprobs)
    straight_through = kind.endswith("+")
    base = KINDS.get(kind[:-1] if straight_through else kind)
    if base is None:
        raise ValueError(f"kind must be one of {sorted(KINDS)} or one of them with a '+' "
                         f"suffix, got {kind!r}")
    if input_clamp is not None:
        _checks.check_positive("input_clamp", input_clamp)
    if output_clamp == "auto":
        output_clamp = AUTO_OUTPUT_CLAMP.get(base)
    elif output_clamp is not None:
        if isinstance(output_clamp, str):
            raise ValueError(f"output_clamp must be a float, None or 'auto', got {output_clamp!r}")
        _checks.check_positive("output_clamp", output_clamp)
    dtype = torch.promote_types(compute_dtype(logprobs.dtype), compute_dtype(ref_logprobs.dtype))
    x = logprobs.to(dtype) - ref_logprobs.to(dtype)
    value = _estimator(base, x, input_clamp)
    if output_clamp is not None:
        value = value.clamp(-output_clamp, output_clamp)
    if not straight_through:
        return value
    k2 = 0.5 * x.square()
    return k2 - k2.detach() + value.detach()
