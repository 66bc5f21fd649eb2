"""Test helpers around the comparison rule (defined in prefkern.testing, shared with the bench)."""

from __future__ import annotations

import torch

from prefkern.dispatch import interpreting
from prefkern.testing import assert_rule, rule_bound, rule_error  # noqa: F401


def leaf(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A fresh leaf copy (optionally cast) that requires grad."""
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(True)


def noisiest(ref, *candidates):
    """Of several bases (the spec computed in different orders or forms), the one farthest
    from ``ref`` (max abs error): one form can be luckily exact where another, as correct,
    rounds (large logits), and the rule's base stands for the noise any correct form may show."""
    def err(x):
        return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0

    present = [c for c in candidates if c is not None]
    return max(present, key=err) if present else None


def assert_equal_to_rounding(a: torch.Tensor, b: torch.Tensor, what: str = "output") -> None:
    """Equal but for summation order: floats within one step of their dtype (the BLAS may pick
    another kernel, another order, for another row count) plus fp32 rounding of the largest
    entry; other dtypes exactly."""
    assert a.shape == b.shape and a.dtype == b.dtype, what
    if not a.is_floating_point():
        assert torch.equal(a, b), what
        return
    a64, b64 = a.detach().double(), b.detach().double()
    step = torch.finfo(a.dtype).eps * torch.maximum(a64.abs(), b64.abs())
    slack = 1e-6 * b64.abs().max().item() if b.numel() else 0.0
    excess = ((a64 - b64).abs() - step - slack).max().item() if a.numel() else 0.0
    assert excess <= 0, f"{what}: differs by more than one step ({excess:.3e} beyond)"


def platform_round(x: torch.Tensor, dtype: torch.dtype, backend: str) -> torch.Tensor:
    """fp32 ``x`` rounded to ``dtype`` the way the backend's platform rounds. Triton's CPU
    interpreter converts fp32 -> bf16 by truncation (round toward zero, even with
    fp_downcast_rounding="rtne"), so under TRITON_INTERPRET the base of a bf16 value a Triton
    kernel rounded is truncated too; everywhere else it is round-to-nearest."""
    if dtype == torch.bfloat16 and backend == "triton" and interpreting():
        return (x.float().view(torch.int32) & ~0xFFFF).view(torch.float32).to(dtype)
    return x.to(dtype)


def contract_dlogits(z, targets, g_logp=None, g_ent=None, g_lse=None, g_stats=None,
                     ignore_index=-100):
    """The d-logits of fp32 logits ``z`` as the numerics contract computes them: from the fp32
    lse and entropy the forward stores (here the exact ones, rounded once), dz = sum_k g_k
    onehot(y_k) - p (sum_k g_k + g_ent (log p + H) - g_lse) with log p = z - lse. Where |z| is
    large, lse's rounding (up to half a step of |z|) shifts every log p: autograd through the
    spec cancels that shift against its entropy's, a kernel that stores lse and H cannot. Rows
    whose targets are all ignored get 0; g_logp: shaped like ``targets``; g_stats: those of
    sum_p2 and mean_logit (+ g_sq 2 p (p - sum_p2) + g_mean / V)."""
    z64 = z.detach().double()
    lse64 = z64.logsumexp(-1, keepdim=True)
    ent = -(z64 - lse64).exp().mul(z64 - lse64).sum(-1, keepdim=True).float()
    log_p = z.detach() - lse64.float()
    lead = (*z.shape[:-1], 1)
    if targets is None:
        y, valid = torch.zeros(lead, dtype=torch.long), torch.zeros(lead, dtype=torch.bool)
    else:
        y = targets if targets.dim() == z.dim() else targets.unsqueeze(-1)
        valid = y != ignore_index
    g = torch.zeros(y.shape) if g_logp is None else torch.where(valid, g_logp.view(y.shape), 0)
    g_h = 0.0 if g_ent is None else g_ent.view(lead)
    g_l = 0.0 if g_lse is None else g_lse.view(lead)
    dz = -log_p.exp() * (g.sum(-1, keepdim=True) + g_h * (log_p + ent) - g_l)
    dz = dz.scatter_add(-1, torch.where(valid, y, 0), g)
    if g_stats is not None:
        p = log_p.exp()
        sum_p2 = (z64 - lse64).exp().square().sum(-1, keepdim=True).float()
        dz = dz + g_stats[0].view(lead) * 2 * p * (p - sum_p2) + g_stats[1].view(lead) / z.shape[-1]
    return dz if targets is None else torch.where(valid.any(-1, keepdim=True), dz, 0.0)
