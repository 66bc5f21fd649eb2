"""One small fwd+bwd of every kernel family, for compute-sanitizer's memcheck on a GPU:

  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \\
      python benchmarks/sanitize_ops.py

(without the caching allocator every tensor is its own allocation, so a read past one is
reported instead of landing in a neighbour's pool block). Ragged shapes (no dimension a multiple
of a tile), ignored rows, bias, softcap and per-row temperatures, so every mask is exercised.
``--device cpu`` runs the same calls on the Triton interpreter (CI checks the script runs)."""

from __future__ import annotations

import argparse
import sys

import torch

import prefkern

# ragged sizes: (N, V) logits, (N, H, V) heads, (B, T, H, V) losses, (B, T) GAE
SIZES = dict(logits=(37, 1031), linear=(45, 72, 1031), losses=(4, 13, 40, 777), gae=(5, 1000))


def _leaf(*shape, device, dtype=torch.bfloat16, scale=1.0):
    return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_(True)


def _targets(n, v, device):
    t = torch.randint(0, v, (n,), device=device)
    t[::5] = -100
    return t


def logits_ops(device, backends):
    n, v = SIZES["logits"]
    for backend in backends:
        logits = _leaf(n, v, device=device, scale=3.0)
        out = prefkern.logprobs_from_logits(logits, _targets(n, v, device), temperature=0.9,
                                            return_entropy=True, return_stats=True,
                                            backend=backend)
        (out.logprobs.sum() + out.entropy.sum() + out.stats.sum_p2.sum()).backward()
    logits, ref = _leaf(n, v, device=device), _leaf(n, v, device=device)
    for kind in ("jsd", "reverse_kl"):
        prefkern.logits_divergence(logits, ref, _targets(n, v, device), kind=kind,
                                   backend="triton").sum().backward()


def linear_ops(device):
    n, h, v = SIZES["linear"]
    t = _targets(n, v, device)
    temperature = torch.rand(n, device=device) + 0.5
    for mode in ("fast", "min_memory"):
        hidden, weight, bias = (_leaf(n, h, device=device), _leaf(v, h, device=device, scale=0.2),
                                _leaf(v, device=device))
        out = prefkern.linear_logprobs(hidden, weight, t, bias, temperature=temperature,
                                       softcap=20.0, return_entropy=True, return_stats=True,
                                       mode=mode, backend="triton")
        (out.logprobs.sum() + out.entropy.sum() + out.stats.sum_p2.sum()).backward()
        ref_hidden, ref_weight = _leaf(n, h + 9, device=device), _leaf(v, h + 9, device=device,
                                                                       scale=0.2)
        for kind in ("forward_kl", "jsd", "alpha"):
            prefkern.linear_divergence(hidden, weight, ref_hidden, ref_weight, t, kind=kind,
                                       bias=bias, temperature=temperature, softcap=20.0,
                                       mode=mode, backend="triton").sum().backward()


def fused_losses(device):
    b, seq, h, v = SIZES["losses"]
    hidden, weight = _leaf(b, seq, h, device=device), _leaf(v, h, device=device, scale=0.2)
    targets = torch.randint(0, v, (b, seq), device=device)
    targets[:, :3] = -100
    old = torch.randn(b, seq, device=device) * 0.1 - 3
    adv = torch.randn(b, seq, device=device)
    loss, _ = prefkern.losses.linear_policy_loss(hidden, weight, targets, old, adv,
                                                 backend="triton")
    loss.backward()
    loss, _ = prefkern.losses.linear_preference_loss(
        hidden, weight, targets, ref_logps=(torch.randn(b // 2, device=device),
                                            torch.randn(b // 2, device=device)),
        backend="triton")
    loss.backward()
    teacher_hidden, teacher_weight = (torch.randn(b, seq, h + 8, device=device).bfloat16(),
                                      torch.randn(v, h + 8, device=device).bfloat16() * 0.2)
    loss, _ = prefkern.losses.linear_distill_loss(hidden, weight, teacher_hidden,
                                                  teacher_weight, targets, backend="triton")
    loss.backward()


def gae_ops(device, backends):
    b, seq = SIZES["gae"]
    rewards, values = torch.randn(2, b, seq, device=device).unbind(0)
    mask = (torch.rand(b, seq, device=device) > 0.1).float()
    cu = torch.tensor([0, 7, 8, b * seq // 2, b * seq], device=device)
    for backend in backends:
        prefkern.gae(rewards, values, mask, gamma=0.99, lam=0.95, backend=backend)
        prefkern.gae(rewards.reshape(-1), values.reshape(-1), cu_seqlens=cu, backend=backend)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    cuda = gpu and prefkern.available_backends(device)["cuda"] is None
    logits_ops(device, ["triton"] + (["cuda"] if cuda else []))
    linear_ops(device)
    fused_losses(device)
    gae_ops(device, ["triton"] + (["cuda"] if cuda else []))
    if gpu:
        torch.cuda.synchronize(device)
    print("sanitize_ops: every kernel family ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
