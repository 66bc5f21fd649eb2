"""Regression guards from the peers' bug reports, as named checks on every CPU-runnable backend:
log-probs never above 0 (a fused kernel once returned log-probs > 0), the padded tail of the last
vocabulary tile never leaks into the softmax (V one past a power of two), ignored rows take
exactly zero gradient and cannot move dW however large their hidden states, and an entropy that
is asked for carries a gradient. (An empty ZeRO-3 head shard: test_deepspeed_zero3.py and
test_transformers_integration.py.)"""

from __future__ import annotations

import pytest
import torch

import prefkern
from prefkern.reference import linear_logprobs_ref

BACKENDS = [("torch", "auto"), ("triton", "fast"), ("triton", "min_memory")]


def _peaked(n=24, h=16, v=257, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen)
    weight[7] = hidden.mean(0) * 40  # token 7 dominates: p(7) ~ 1 on most rows
    targets = torch.full((n,), 7)
    targets[::3] = torch.randint(0, v, (len(targets[::3]),), generator=gen)
    return hidden, weight, targets


@pytest.mark.parametrize("backend,mode", BACKENDS)
def test_log_probs_never_exceed_zero(backend, mode):
    hidden, weight, targets = _peaked()
    for t in (targets, torch.stack([targets, torch.full_like(targets, 7)], -1)):  # (N,), (N, K)
        logp = prefkern.linear_logprobs(hidden, weight, t, backend=backend, mode=mode)
        assert (logp <= 0).all(), logp.max()
    logits = hidden @ weight.T
    logp = prefkern.logprobs_from_logits(logits, targets, backend=backend)
    assert (logp <= 0).all(), logp.max()
    stacked = prefkern.logprobs_from_logits(logits, torch.stack([targets, targets], -1),
                                            backend=backend)
    assert (stacked <= 0).all(), stacked.max()


@pytest.mark.parametrize("backend,mode", BACKENDS)
@pytest.mark.parametrize("v", [129, 257, 4097])
def test_the_padded_tail_of_the_last_tile_never_counts(backend, mode, v):
    """All real logits very negative: a padded column counted as 0 (not -inf) would dominate
    the softmax and move lse by whole nats."""
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(6, 8, generator=gen).abs() + 1
    weight = -torch.rand(v, 8, generator=gen) * 20 - 50  # every logit < -400
    targets = torch.randint(0, v, (6,), generator=gen)
    out = prefkern.linear_logprobs(hidden, weight, targets, return_lse=True,
                                   return_entropy=True, backend=backend, mode=mode)
    ref = linear_logprobs_ref(hidden.double(), weight.double(), targets, return_lse=True,
                              return_entropy=True)
    torch.testing.assert_close(out.lse, ref.lse.float(), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(out.logprobs, ref.logprobs.float(), rtol=1e-4, atol=1e-3)
    assert (out.entropy <= torch.log(torch.tensor(float(v))) + 1e-4).all()


@pytest.mark.parametrize("backend,mode", BACKENDS)
def test_ignored_rows_take_exactly_zero_gradient(backend, mode):
    hidden, weight, targets = _peaked()
    targets[1::2] = -100
    grads = []
    for scale in (1.0, 1e3):  # huge hidden states on ignored rows must not reach dW
        h = hidden.clone()
        h[1::2] *= scale
        h.requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        out = prefkern.linear_logprobs(h, w, targets, return_entropy=True, backend=backend,
                                       mode=mode)
        (out.logprobs.sum() + out.entropy.sum()).backward()
        assert (h.grad[1::2] == 0).all() and (out.logprobs[1::2] == 0).all()
        grads.append(w.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,mode", BACKENDS)
def test_an_entropy_asked_for_carries_a_gradient(backend, mode):
    hidden, weight, targets = _peaked(seed=2)
    weight = weight * 0.05  # a spread softmax: the entropy is far from 0
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    out = prefkern.linear_logprobs(h, w, targets, return_entropy=True, backend=backend,
                                   mode=mode)
    out.entropy.sum().backward()
    assert h.grad.abs().sum() > 0 and w.grad.abs().sum() > 0
    ref_h = hidden.double().requires_grad_(True)
    linear_logprobs_ref(ref_h, weight.double(), targets, return_entropy=True).entropy.sum() \
        .backward()
    torch.testing.assert_close(h.grad, ref_h.grad.float(), rtol=1e-3, atol=1e-5)
