"""The comparison rule every prefkern test and the benchmark's correctness gate apply, to outputs
and gradients alike:

    ref  = op_ref(inputs upcast to fp64)     # ground truth
    base = op_ref(inputs in the test dtype)  # what a practitioner would write (or, where the
                                             # contract promises more, the fp32-accumulated spec)
    max|out - ref| <= 2 * max|base - ref| + floor

floor = (ROUNDING[out.dtype] + 2 * u_acc * sqrt(reduction)) * max|ref| + tiny[out.dtype]: about
one rounding of the output dtype, plus the error of summing ``reduction`` terms in the
accumulation dtype (u_acc: unit roundoff of fp32, or fp64 for fp64 outputs), plus the smallest
normal number of the output dtype (below it a value is not representable). The sqrt is the
standard deviation of a sum of independent roundings (Higham, "Accuracy and Stability of
Numerical Algorithms", 2nd ed., sec. 4.2), so the floor does not rest on one CPU's summation
order.
"""

from __future__ import annotations

import math

import torch

# one rounding (a few units in the last place) of each output dtype, relative to max|ref|
ROUNDING = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-3,
            torch.bfloat16: 4e-3}
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24}


def rule_bound(ref: torch.Tensor, base: torch.Tensor, dtype: torch.dtype,
               reduction: int = 1, scale: float | None = None) -> tuple[float, float]:
    """-> (bound, base error) of the rule for an output of ``dtype`` whose entries each sum
    ``reduction`` terms. ``scale``: the magnitude of the terms, where an output is a small
    difference of larger ones (a softmax gradient p (g - sum p g) at a dominant token); the
    floor is relative to it instead of max|ref| (never below max|ref|)."""
    r, b = ref.detach().double(), base.detach().double()
    if r.numel() == 0:
        return 0.0, 0.0
    base_err = (b - r).abs().max().item()
    u_acc = UNIT_ROUNDOFF[torch.promote_types(dtype, torch.float32)]
    floor = ROUNDING[dtype] + 2 * u_acc * math.sqrt(max(reduction, 1))
    # + the dtype's smallest normal number: a difference it cannot represent is no error
    magnitude = max(r.abs().max().item(), scale or 0.0)
    return 2 * base_err + floor * magnitude + torch.finfo(dtype).tiny, base_err


def rule_error(out: torch.Tensor, ref: torch.Tensor, base: torch.Tensor,
               reduction: int = 1, scale: float | None = None) -> tuple[float, float, float]:
    """-> (max|out - ref|, bound, base error); inf error when out has non-finite values."""
    o, r = out.detach().double(), ref.detach().double()
    bound, base_err = rule_bound(r, base, out.dtype, reduction, scale)
    if o.numel() == 0:
        return 0.0, bound, base_err
    if not torch.isfinite(o).all():
        return math.inf, bound, base_err
    return (o - r).abs().max().item(), bound, base_err


def assert_rule(out, ref, base, what: str = "output", reduction: int = 1,
                scale: float | None = None) -> None:
    """Raise AssertionError unless ``out`` satisfies the rule against ``ref`` and ``base``."""
    assert out is not None, f"{what}: missing"
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err, bound, base_err = rule_error(out, ref, base, reduction, scale)
    assert err <= bound, (f"{what}: max|out-ref| = {err:.3e} > bound {bound:.3e} "
                          f"(base error {base_err:.3e}, reduction {reduction}, "
                          f"dtype {out.dtype})")
