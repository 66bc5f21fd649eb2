"""The comparison rule must pass correct kernels and fail deliberately wrong ones: an off-by-one
target column, a missing 1/T, logits rounded to bf16 where the contract promises fp32."""

from __future__ import annotations

import pytest
import torch
from cases import make_logits, make_targets
from compare import assert_rule, leaf

import prefkern
from prefkern.reference import linear_logprobs_ref, logprobs_from_logits_ref

V = 1000


def _check_logprobs(kernel, dtype=torch.float32, temperature=0.7):
    """Apply the rule to ``kernel(logits, targets, temperature)`` -> (logp, dlogits)."""
    logits = make_logits((37,), V).to(dtype)
    targets = make_targets((37,), V, 0.25)
    results = []
    for fn, x in ((kernel, leaf(logits)),
                  (logprobs_from_logits_ref, leaf(logits, torch.float64)),
                  (logprobs_from_logits_ref, leaf(logits))):
        out = fn(x, targets, temperature=temperature)
        out.sum().backward()
        results.append((out, x.grad))
    (out, grad), (ref, ref_grad), (base, base_grad) = results
    assert_rule(out, ref, base, "logprobs", reduction=V)
    assert_rule(grad, ref_grad, base_grad, "dlogits", reduction=V)


def _off_by_one(logits, targets, temperature):
    shifted = torch.where(targets >= 0, (targets + 1) % V, targets)
    return logprobs_from_logits_ref(logits, shifted, temperature=temperature)


def _missing_temperature(logits, targets, temperature):
    return logprobs_from_logits_ref(logits, targets)


def _gradient_off_by_one_percent(logits, targets, temperature):
    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * 1.01

    return logprobs_from_logits_ref(Scale.apply(logits), targets, temperature=temperature)


def test_rule_passes_the_real_kernel():
    _check_logprobs(lambda x, y, temperature: prefkern.logprobs_from_logits(
        x, y, temperature=temperature, backend="torch"))
    _check_logprobs(lambda x, y, temperature: prefkern.logprobs_from_logits(
        x, y, temperature=temperature, backend="torch"), dtype=torch.bfloat16)


@pytest.mark.parametrize("wrong", [_off_by_one, _missing_temperature,
                                   _gradient_off_by_one_percent])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rule_fails_wrong_kernels(wrong, dtype):
    with pytest.raises(AssertionError):
        _check_logprobs(wrong, dtype)


def _check_linear(kernel):
    gen = torch.Generator().manual_seed(1)
    n, h = 48, 128
    hidden = torch.randn(n, h, generator=gen).bfloat16()
    weight = (torch.randn(V, h, generator=gen) * (6.0 / h**0.5)).bfloat16()  # logit std ~6
    targets = make_targets((n,), V, 0.0)
    ref = linear_logprobs_ref(hidden.double(), weight.double(), targets)
    base = linear_logprobs_ref(hidden, weight, targets)  # the fp32-accumulated contract
    assert_rule(kernel(hidden, weight, targets), ref, base, "logprobs", reduction=V)


def _bf16_rounded_logits(hidden, weight, targets):
    return logprobs_from_logits_ref(hidden @ weight.T, targets)  # eager bf16 LM head


def test_rule_fails_bf16_rounded_logits():
    _check_linear(lambda h, w, y: prefkern.linear_logprobs(h, w, y, backend="torch"))
    with pytest.raises(AssertionError, match="logprobs"):
        _check_linear(_bf16_rounded_logits)


def test_floor_grows_with_the_reduction_length():
    from prefkern.testing import rule_bound

    ref = torch.ones(4, dtype=torch.float64)
    short, _ = rule_bound(ref, ref, torch.float32, reduction=1)
    long, _ = rule_bound(ref, ref, torch.float32, reduction=70_000)
    assert long > 5 * short
    # still far below what a wrong kernel produces (a bf16 rounding of logits ~ 4e-3 relative)
    assert long < 1e-4
