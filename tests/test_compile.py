"""The ops trace under torch.compile(fullgraph=True): custom ops with fake implementations, no
graph breaks, same values and gradients as eager."""

from __future__ import annotations

import pytest
import torch
from cases import make_targets

import prefkern


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


def _assert_compiled_matches(fn, *inputs):
    """fn and its fullgraph compilation give the same value and gradients to ``inputs``."""
    eager = fn(*inputs)
    d_eager = torch.autograd.grad(eager, inputs)
    compiled = _compiled(fn)(*inputs)
    d_compiled = torch.autograd.grad(compiled, inputs)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(d_compiled, d_eager, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_logprobs_fullgraph(backend):
    hidden = torch.randn(12, 32, requires_grad=True)
    weight = (torch.randn(100, 32) / 6).requires_grad_(True)
    targets = make_targets((12,), 100, 0.25)

    def fn(h, w):
        out = prefkern.linear_logprobs(h, w, targets, return_entropy=True, backend=backend)
        return out.logprobs.sum() - 0.1 * out.entropy.sum()

    _assert_compiled_matches(fn, hidden, weight)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logprobs_from_logits_fullgraph(backend):
    logits = torch.randn(3, 5, 64, requires_grad=True)
    targets = make_targets((3, 5), 64, 0.25)

    def fn(x):
        return prefkern.logprobs_from_logits(x, targets, temperature=0.9, backend=backend).sum()

    _assert_compiled_matches(fn, logits)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_head_options_fullgraph(backend):
    """Per-row temperature, logit scale, softcap and (N, K) targets trace too; skip_ignored is
    off while tracing (it would bake the valid-row count into the graph)."""
    hidden = torch.randn(12, 32, requires_grad=True)
    weight = (torch.randn(100, 32) / 6).requires_grad_(True)
    targets = make_targets((12, 3), 100, 0.25)
    temperature = torch.rand(12) + 0.5

    def fn(h, w):
        out = prefkern.linear_logprobs(h, w, targets, temperature=temperature, logit_scale=0.5,
                                       softcap=8.0, return_entropy=True, skip_ignored=True,
                                       backend=backend)
        return out.logprobs.sum() - 0.1 * out.entropy.sum()

    _assert_compiled_matches(fn, hidden, weight)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("inplace", [False, True])
def test_logits_head_options_fullgraph(backend, inplace):
    logits = torch.randn(3, 5, 64, requires_grad=True)
    targets = make_targets((3, 5, 4), 64, 0.25)
    temperature = torch.rand(3, 5) + 0.5

    def fn(x):
        z = x * 1.0  # an intermediate, as a model's logits are: inplace_backward may reuse it
        out = prefkern.logprobs_from_logits(z, targets, temperature=temperature,
                                            logit_scale=2.0, return_entropy=True,
                                            inplace_backward=inplace, backend=backend)
        return out.logprobs.sum() + prefkern.entropy_from_logits(x, backend=backend).sum()

    _assert_compiled_matches(fn, logits)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_divergence_fullgraph(backend):
    """Both sides take gradients; a mixture reference with a per-row coefficient and bias."""
    hidden = torch.randn(10, 24, requires_grad=True)
    weight = (torch.randn(90, 24) / 5).requires_grad_(True)
    ref_hidden = torch.randn(10, 16, requires_grad=True)
    ref_weight = (torch.randn(90, 16) / 4).requires_grad_(True)
    coeff, ref_bias = torch.rand(10) + 0.5, torch.randn(90)
    targets = make_targets((10,), 90, 0.25)

    def fn(h, w, rh, rw):
        out = prefkern.linear_divergence(
            h, w, [(rh, rw, coeff, ref_bias), (h.detach(), w.detach(), 0.5)], None, targets,
            kind="jsd", beta=0.3, temperature=0.8, return_logprobs=True, backend=backend)
        return out.divergence.sum() + 0.1 * out.logprobs.sum()

    _assert_compiled_matches(fn, hidden, weight, ref_hidden, ref_weight)


def test_linear_divergence_min_memory_fullgraph():
    """The fused Triton passes trace as the same custom ops (the reference takes a gradient)."""
    hidden = torch.randn(10, 24, requires_grad=True)
    weight = (torch.randn(90, 24) / 5).requires_grad_(True)
    ref_hidden = torch.randn(10, 16, requires_grad=True)
    ref_weight = (torch.randn(90, 16) / 4).requires_grad_(True)
    targets = make_targets((10,), 90, 0.25)

    def fn(h, w, rh, rw):
        out = prefkern.linear_divergence(h, w, rh, rw, targets, kind="tv", temperature=0.8,
                                         return_logprobs=True, backend="triton",
                                         mode="min_memory")
        return out.divergence.sum() + 0.1 * out.logprobs.sum()

    _assert_compiled_matches(fn, hidden, weight, ref_hidden, ref_weight)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logits_divergence_fullgraph(backend):
    logits = torch.randn(3, 5, 64, requires_grad=True)
    ref_logits = torch.randn(3, 5, 64, requires_grad=True)
    temperature = torch.rand(3, 5) + 0.5

    def fn(x, r):
        return prefkern.logits_divergence(x, r, kind="reverse_kl", temperature=temperature,
                                          backend=backend).sum()

    _assert_compiled_matches(fn, logits, ref_logits)
