"""Bad target ids on the gradient-in-forward losses: a clear error before any GEMM on CPU
(PREFKERN_CHECKS=auto/sync), a NaN loss without a host read where checks are lazy (what CUDA
tensors get); never a silent finite loss (an id past the vocabulary used to score as -lse)."""

from __future__ import annotations

import pytest
import torch

from prefkern import _checks
from prefkern.losses import linear_distill_loss, linear_policy_loss, linear_preference_loss


def _problem(bad_id: int):
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 5, 8, generator=gen, requires_grad=True)
    weight = torch.randn(11, 8, generator=gen, requires_grad=True)
    targets = torch.randint(0, 11, (2, 5), generator=gen)
    targets[0, 1] = bad_id
    return hidden, weight, targets


LOSSES = {
    "policy": lambda h, w, t: linear_policy_loss(h, w, t, -torch.ones(2, 5), torch.ones(2),
                                                 backend="torch"),
    "preference": lambda h, w, t: linear_preference_loss(
        h, w, t, ref_logps=(torch.zeros(1), torch.zeros(1)), backend="torch"),
    "distill": lambda h, w, t: linear_distill_loss(h, w, h.detach() * 0.5, w.detach(), t,
                                                   backend="torch"),
}


@pytest.mark.parametrize("bad_id", [11, -3])
@pytest.mark.parametrize("name", list(LOSSES))
def test_bad_target_raises_on_cpu(name, bad_id):
    with pytest.raises(ValueError, match=r"targets must be in \[0, 11\)"):
        LOSSES[name](*_problem(bad_id))


@pytest.mark.parametrize("name", list(LOSSES))
def test_bad_target_poisons_the_loss_when_checks_are_lazy(name, monkeypatch):
    monkeypatch.setenv(_checks.CHECKS_ENV, "lazy")
    loss, _ = LOSSES[name](*_problem(11))
    assert torch.isnan(loss), f"{name}: {loss}"
    with pytest.raises(ValueError, match="bad input"):  # the record, read later
        _checks.raise_on_bad_input()
    good, _ = LOSSES[name](*_problem(4))
    assert torch.isfinite(good)
    _checks.raise_on_bad_input()  # cleared


@pytest.mark.parametrize("name", list(LOSSES))
def test_dw_budget_picks_the_two_pass_path_for_a_large_half_head(name):
    """dw_budget_bytes below the fp32 (V, H) accumulator of a bf16 weight (4VH bytes) takes
    the two-pass path (no GradientInForward node), with the same loss and gradients as the
    fused path; an fp32 weight needs no accumulator and stays fused."""
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 5, 8, generator=gen)
    weight = torch.randn(11, 8, generator=gen)
    targets = torch.randint(0, 11, (2, 5), generator=gen)
    runs = {}
    for dtype in (torch.bfloat16, torch.float32):
        for budget in (None, 4 * 11 * 8 - 1):
            h = hidden.to(dtype).requires_grad_(True)
            w = weight.to(dtype).requires_grad_(True)
            if name == "distill":
                loss, _ = linear_distill_loss(h, w, h.detach() * 0.5, w.detach(), targets,
                                              dw_budget_bytes=budget, backend="torch")
            elif name == "policy":
                loss, _ = linear_policy_loss(h, w, targets, -torch.ones(2, 5), torch.ones(2),
                                             dw_budget_bytes=budget, backend="torch")
            else:
                loss, _ = linear_preference_loss(h, w, targets, ref_logps=(torch.zeros(1),
                                                                           torch.zeros(1)),
                                                 dw_budget_bytes=budget, backend="torch")
            fused = type(loss.grad_fn).__name__.startswith("GradientInForward")
            assert fused == (budget is None or dtype == torch.float32), (dtype, budget)
            loss.backward()
            runs[dtype, budget] = (loss.detach(), h.grad.float(), w.grad.float())
    for a, b in zip(runs[torch.bfloat16, None], runs[torch.bfloat16, 4 * 11 * 8 - 1],
                    strict=True):  # two bf16 roundings apart at most
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-2 * b.abs().max().item())


def test_dw_budget_counts_the_autocast_dtype():
    """An fp32 weight under bf16 autocast runs the head in bf16: its fp32 accumulator counts."""
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 5, 8, generator=gen, requires_grad=True)
    weight = torch.randn(11, 8, generator=gen, requires_grad=True)
    targets = torch.randint(0, 11, (2, 5), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = linear_policy_loss(hidden, weight, targets, -torch.ones(2, 5), torch.ones(2),
                                     dw_budget_bytes=4 * 11 * 8 - 1, backend="torch")
    assert not type(loss.grad_fn).__name__.startswith("GradientInForward")
