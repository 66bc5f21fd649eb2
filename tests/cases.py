"""Input generators shared by the op tests."""

from __future__ import annotations

import torch


def make_targets(lead, vocab: int, ignore_frac: float, device="cpu", ignore_index: int = -100):
    targets = torch.randint(0, vocab, lead, device=device)
    if ignore_frac >= 1.0:
        return torch.full_like(targets, ignore_index)
    if ignore_frac > 0:
        targets[torch.rand(lead, device=device) < ignore_frac] = ignore_index
    return targets


def make_logits(lead, vocab: int, kind: str = "normal", device="cpu") -> torch.Tensor:
    """fp32 logits. kinds: normal (std 3), extreme (+-1e4 spikes on std-30 noise),
    negative (all far below 0), peaked (one dominant token per row)."""
    z = torch.randn(*lead, vocab, device=device)
    if kind == "normal":
        return 3 * z
    if kind == "extreme":
        z = 30 * z
        spikes = torch.rand(*lead, vocab, device=device) < 0.01
        return torch.where(spikes, torch.sign(z) * 1e4, z)
    if kind == "negative":
        return z - 500.0
    if kind == "peaked":
        z = 2 * z
        top = torch.randint(0, vocab, (*lead, 1), device=device)
        return z.scatter_add(-1, top, torch.full_like(top, 15.0, dtype=z.dtype))
    raise ValueError(kind)
