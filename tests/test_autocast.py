"""Autocast: one policy per op, identical in forward and backward (the backward is the gradient
of what the forward computed, whether it runs inside the autocast region or after it)."""

from __future__ import annotations

import pytest
import torch
from cases import make_logits, make_targets

import prefkern

LINEAR_VARIANTS = [("torch", "auto"), ("triton", "fast"), ("triton", "min_memory")]


def _linear_step(device, backend, mode, backward_inside: bool, autocast: bool):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(12, 32, generator=gen).to(device).requires_grad_(True)
    weight = torch.randn(70, 32, generator=gen).to(device).requires_grad_(True)
    bias = torch.randn(70, generator=gen).to(device).requires_grad_(True)
    targets = make_targets((12,), 70, 0.25, device)
    g = torch.randn(12, generator=gen).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        out = prefkern.linear_logprobs(hidden, weight, targets, bias, return_entropy=True,
                                       backend=backend, mode=mode)
        loss = (out.logprobs * g).sum() + out.entropy.sum()
        if backward_inside:
            loss.backward()
    if not backward_inside:
        loss.backward()
    return out, hidden.grad, weight.grad, bias.grad


def _bf16_run(device, backend, mode):
    """What the autocast policy promises: the op on bf16 casts of the inputs, no autocast."""
    gen = torch.Generator().manual_seed(0)
    leaves = [torch.randn(12, 32, generator=gen), torch.randn(70, 32, generator=gen),
              torch.randn(70, generator=gen)]
    leaves = [t.to(device).requires_grad_(True) for t in leaves]
    hidden, weight, bias = leaves
    targets = make_targets((12,), 70, 0.25, device)
    g = torch.randn(12, generator=gen).to(device)
    out = prefkern.linear_logprobs(hidden.bfloat16(), weight.bfloat16(), targets,
                                   bias.bfloat16(), return_entropy=True, backend=backend,
                                   mode=mode)
    ((out.logprobs * g).sum() + out.entropy.sum()).backward()
    return out, hidden.grad, weight.grad, bias.grad


def _check_linear(device, backend, mode):
    torch.manual_seed(0)
    expected = _bf16_run(device, backend, mode)
    for inside in (True, False):
        torch.manual_seed(0)
        got = _linear_step(device, backend, mode, inside, autocast=True)
        assert got[0].logprobs.dtype == torch.float32
        torch.testing.assert_close(got[0].logprobs, expected[0].logprobs)
        torch.testing.assert_close(got[0].entropy, expected[0].entropy)
        for a, b in zip(got[1:], expected[1:], strict=True):
            assert a.dtype == torch.float32  # the fp32 leaves get fp32 grads through the cast
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend,mode", LINEAR_VARIANTS)
def test_linear_logprobs_under_cpu_autocast(backend, mode):
    _check_linear(torch.device("cpu"), backend, mode)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logprobs_from_logits_ignores_autocast(backend):
    logits = make_logits((5, 7), 90).requires_grad_(True)
    targets = make_targets((5, 7), 90, 0.25)
    plain = prefkern.logprobs_from_logits(logits, targets, return_entropy=True, backend=backend)
    (g_plain,) = torch.autograd.grad(plain.logprobs.sum() + plain.entropy.sum(), logits)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = prefkern.logprobs_from_logits(logits, targets, return_entropy=True,
                                             backend=backend)
        (g_auto,) = torch.autograd.grad(auto.logprobs.sum() + auto.entropy.sum(), logits)
    torch.testing.assert_close(auto.logprobs, plain.logprobs, rtol=0, atol=0)
    torch.testing.assert_close(g_auto, g_plain, rtol=0, atol=0)


def test_advantages_ignore_autocast():
    rewards, values = torch.randn(2, 3, 11).unbind(0)
    plain = prefkern.gae(rewards, values, lam=0.9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = prefkern.gae(rewards, values, lam=0.9)
    for a, b in zip(auto, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_check_sees_an_inconsistent_backward(monkeypatch):
    """Without the policy (autocast reaching the nested GEMMs only in the forward), the
    comparison above fails: the check can fail."""
    import contextlib

    from prefkern.ops import linear_logprobs as module

    monkeypatch.setattr(module.head_mod, "autocast_inputs", lambda *tensors: tensors)
    monkeypatch.setattr(module, "without_autocast", lambda t: contextlib.nullcontext())
    # wrong values, or (the torch backend's out= GEMM) a dtype error under autocast
    with pytest.raises((AssertionError, RuntimeError)):
        _check_linear(torch.device("cpu"), "torch", "auto")


@pytest.mark.gpu
@pytest.mark.parametrize("backend,mode", LINEAR_VARIANTS)
def test_gpu_linear_logprobs_under_autocast(backend, mode):
    _check_linear(torch.device("cuda"), backend, mode)
