"""More than 2^31 logits elements (N=20000, V=128256 bf16: 2.57e9): every offset past int32 in
the kernels must be 64-bit. Checked against an fp32 reference computed a chunk of rows at a
time, on the last rows (whose elements sit beyond 2^31) and on whole-tensor gradients."""

from __future__ import annotations

import pytest
import torch
from cases import make_targets

import prefkern

N, V = 20_000, 128_256
CHUNK = 2_000


def _close(got: torch.Tensor, want: torch.Tensor, name: str, rtol: float) -> None:
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    assert err <= rtol * (1 + scale), f"{name}: error {err:.3e} at scale {scale:.3e}"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
def test_gpu_logprobs_from_logits_past_int32(backend):
    assert N * V > 2**31
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(N, V, device="cuda", generator=gen) * 3).bfloat16()
    logits.requires_grad_(True)
    targets = make_targets((N,), V, 0.1, "cuda")
    g = torch.randn(N, device="cuda", generator=gen)
    out = prefkern.logprobs_from_logits(logits, targets, return_entropy=True, backend=backend)
    ((out.logprobs * g).sum() + out.entropy.sum()).backward()
    valid = targets != -100
    for start in (0, N - CHUNK):  # the last rows live past 2^31 elements
        rows = slice(start, start + CHUNK)
        z = logits.detach()[rows].float().requires_grad_(True)
        logp = z.log_softmax(-1)
        picked = logp.gather(-1, torch.where(valid[rows], targets[rows], 0)[:, None])[:, 0]
        picked = torch.where(valid[rows], picked, 0)
        entropy = torch.where(valid[rows], -(logp.exp() * logp).sum(-1), 0)
        ((picked * g[rows]).sum() + entropy.sum()).backward()
        _close(out.logprobs[rows], picked, f"logprobs[{start}:]", 1e-5)
        _close(out.entropy[rows], entropy, f"entropy[{start}:]", 1e-5)
        _close(logits.grad[rows], z.grad, f"dlogits[{start}:]", 2**-7)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["fast", "min_memory"])
def test_gpu_linear_logprobs_past_int32(mode):
    h = 128
    gen = torch.Generator(device="cuda").manual_seed(1)
    hidden = torch.randn(N, h, device="cuda", generator=gen).bfloat16().requires_grad_(True)
    weight = (torch.randn(V, h, device="cuda", generator=gen) * (4 / h**0.5)).bfloat16()
    weight.requires_grad_(True)
    targets = make_targets((N,), V, 0.1, "cuda")
    g = torch.randn(N, device="cuda", generator=gen)
    out = prefkern.linear_logprobs(hidden, weight, targets, return_entropy=True,
                                   backend="triton", mode=mode)
    ((out.logprobs * g).sum() + out.entropy.sum()).backward()
    w32 = weight.detach().float().requires_grad_(True)
    valid = targets != -100
    for start in range(0, N, CHUNK):
        rows = slice(start, start + CHUNK)
        h32 = hidden.detach()[rows].float().requires_grad_(True)
        logp = (h32 @ w32.T).log_softmax(-1)
        picked = logp.gather(-1, torch.where(valid[rows], targets[rows], 0)[:, None])[:, 0]
        picked = torch.where(valid[rows], picked, 0)
        entropy = torch.where(valid[rows], -(logp.exp() * logp).sum(-1), 0)
        ((picked * g[rows]).sum() + entropy.sum()).backward()
        _close(out.logprobs[rows], picked.detach(), f"logprobs[{start}:]", 1e-5)
        _close(out.entropy[rows], entropy.detach(), f"entropy[{start}:]", 1e-5)
        _close(hidden.grad[rows], h32.grad, f"dhidden[{start}:]", 2**-7)
    _close(weight.grad, w32.grad, "dweight", 2**-7)
