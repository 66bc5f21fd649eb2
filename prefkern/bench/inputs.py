"""Realistic inputs: peaked logits (the benchmark protocol in benchmarks/README.md).

hidden ~ N(0, 1) with column 0 set to 1; W ~ N(0, 9/H) with column 0 = -1.2 * log(rank) over a
random permutation of the vocab (a Zipf prior); targets sampled from the model's own softmax,
as in RL rollouts, a fraction ``ignore_frac`` of them (at random positions) set to
IGNORE_INDEX (prompt and padding tokens). At H=4096, V=128256 this gives logit std ~3.2, mean
max-probability ~0.31, entropy ~4.1 nats; the bench prints the measured values of every input.
Plain random logits would give a near-uniform softmax, which flatters methods that skip small
entries.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def peaked_problem(n: int, h: int, v: int, dtype=torch.bfloat16, device="cpu", seed: int = 0,
                   ignore_frac: float = 0.0):
    """-> (hidden (n, h), weight (v, h), targets (n,) int64); round(ignore_frac * n) targets,
    at random positions, are IGNORE_INDEX."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen)
    hidden[:, 0] = 1.0
    weight = torch.randn(v, h, generator=gen) * (3.0 / h**0.5)
    rank = torch.empty(v)
    rank[torch.randperm(v, generator=gen)] = torch.arange(1, v + 1, dtype=torch.float32)
    weight[:, 0] = -1.2 * torch.log(rank)
    hidden, weight = hidden.to(device), weight.to(device)
    targets = torch.empty(n, dtype=torch.int64, device=device)
    step = max(1, (1 << 26) // v)  # sample from softmax in row chunks: never (n, v) at once
    for r0 in range(0, n, step):
        probs = torch.softmax(hidden[r0:r0 + step] @ weight.T, dim=-1)
        # drawn on the CPU from the seeded generator: the same targets on any device and
        # whatever the global RNG state
        draw = torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(1)
        targets[r0:r0 + step] = draw.to(device)
    n_ignored = round(ignore_frac * n)
    if n_ignored:
        targets[torch.randperm(n, generator=gen)[:n_ignored].to(device)] = IGNORE_INDEX
    return hidden.to(dtype), weight.to(dtype), targets


def ignored_fraction(targets: torch.Tensor) -> float:
    return (targets == IGNORE_INDEX).float().mean().item()


def logit_stats(hidden, weight, rows: int = 256) -> dict:
    """std of the logits, mean max-probability and mean entropy on the first rows."""
    z = (hidden[:rows].float() @ weight.float().T)
    p = z.softmax(-1)
    entropy = -(p * z.log_softmax(-1)).sum(-1)
    return {"logit_std": z.std().item(), "mean_max_p": p.amax(-1).mean().item(),
            "mean_entropy": entropy.mean().item()}
