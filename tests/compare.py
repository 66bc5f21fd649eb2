"""The comparison rule of DESIGN.md, for outputs and gradients alike:

    ref  = op_ref(inputs upcast to fp64)     # ground truth
    base = op_ref(inputs in the test dtype)  # what a practitioner would write
    max|out - ref| <= 2 * max|base - ref| + atol[out.dtype] * max|ref|

atol is relative to the tensor's scale: about one unit in the last place of its dtype.
"""

from __future__ import annotations

import torch

ATOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 4e-3}


def assert_rule(out, ref, base, what: str = "output") -> None:
    assert out is not None, f"{what}: missing"
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    o, r, b = (t.detach().to(torch.float64) for t in (out, ref, base))
    assert torch.isfinite(o).all(), f"{what}: non-finite values"
    err = (o - r).abs().max().item() if o.numel() else 0.0
    base_err = (b - r).abs().max().item() if o.numel() else 0.0
    scale = r.abs().max().item() if o.numel() else 0.0
    bound = 2 * base_err + ATOL[out.dtype] * scale
    assert err <= bound, (f"{what}: max|out-ref| = {err:.3e} > bound {bound:.3e} "
                          f"(base error {base_err:.3e}, scale {scale:.3e}, dtype {out.dtype})")


def leaf(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A fresh leaf copy (optionally cast) that requires grad."""
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(True)
