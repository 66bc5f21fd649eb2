"""Which tokens a policy loss treats specially: the covariance selections of Clip-Cov / KL-Cov
(Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for Reasoning Language
Models", arXiv 2505.22617; verl-project/verl 1dda039 core_algos.py
``compute_policy_loss_clip_cov`` / ``_kl_cov``) and TRL's high-entropy mask
(huggingface/trl f2cd577 grpo_trainer.py ``get_high_entropy_mask``).

The covariance selections keep the count on the device: tokens are ranked by a sort and the
first ``k`` (a device tensor) taken, so no host sync (verl reads the count with ``.item()``).
"""

from __future__ import annotations

import torch
from torch import Tensor

# torch.quantile refuses inputs above this many elements; past it the same linear
# interpolation is computed from a sort
_QUANTILE_MAX = 1 << 24


def token_covariance(logprobs: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """``(A - masked_mean(A)) * (logp - masked_mean(logp))`` per token, detached, fp32."""
    mask = mask.bool()
    count = mask.sum().clamp(min=1)
    adv, logp = advantages.detach().float(), logprobs.detach().float()
    adv_mean = torch.where(mask, adv, 0).sum() / count
    logp_mean = torch.where(mask, logp, 0).sum() / count
    return (adv - adv_mean) * (logp - logp_mean)


def _first_k(keys: Tensor, k: Tensor) -> Tensor:
    """Bool mask of the ``k`` entries with the largest keys (-inf keys never count)."""
    flat = keys.reshape(-1)
    order = flat.argsort(descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(flat.numel(),
                                                                   device=flat.device))
    return ((rank < k) & (flat > -float("inf"))).view(keys.shape)


def clip_cov_selection(logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                       ratio: float = 2e-4, lower: float = 1.0, upper: float = 5.0,
                       exclude: Tensor | None = None,
                       generator: torch.Generator | None = None) -> Tensor:
    """Clip-Cov's tokens whose gradient is cut: among valid tokens (not in ``exclude``: verl's
    already-clipped ones) with covariance in (lower, upper), a uniformly random subset of
    ``max(int(ratio * n_valid), 1)``. -> bool, shaped like mask."""
    if not ratio > 0:
        raise ValueError(f"clip_cov ratio must be > 0, got {ratio}")
    mask = mask.bool()
    cov = token_covariance(logprobs, advantages, mask)
    candidate = mask & (cov > lower) & (cov < upper)
    if exclude is not None:
        candidate = candidate & ~exclude.bool()
    count = (ratio * mask.sum().double()).floor().clamp(min=1)  # fp64: Python int(ratio * n)
    noise = torch.rand(mask.shape, generator=generator, device=mask.device)
    return _first_k(torch.where(candidate, noise, -float("inf")), count)


def kl_cov_selection(logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                     ratio: float = 2e-4) -> Tensor:
    """KL-Cov's tokens that get the |log-ratio| penalty: the ``max(int(ratio * n_valid), 1)``
    valid tokens of largest covariance. -> bool, shaped like mask."""
    if not ratio > 0:
        raise ValueError(f"kl_cov ratio must be > 0, got {ratio}")
    mask = mask.bool()
    cov = token_covariance(logprobs, advantages, mask)
    count = (ratio * mask.sum().double()).floor().clamp(min=1)  # fp64: Python int(ratio * n)
    return _first_k(torch.where(mask, cov, -float("inf")), count)


def _quantile(values: Tensor, q: float) -> Tensor:
    """torch.quantile's linear interpolation, also past its size limit."""
    if values.numel() <= _QUANTILE_MAX:
        return torch.quantile(values, q)
    ordered = values.sort().values
    pos = q * (values.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, values.numel() - 1)
    return torch.lerp(ordered[lo], ordered[hi], pos - lo)


def high_entropy_mask(entropy: Tensor, mask: Tensor, top_quantile: float,
                      process_group=None) -> Tensor:
    """TRL's ``top_entropy_quantile`` mask: the valid tokens whose entropy is at least the
    ``1 - top_quantile`` quantile (torch.quantile's linear interpolation) of every valid
    token's entropy -> bool, shaped like mask. With a ``process_group`` the quantile spans its
    ranks (an all-gather; the per-rank counts are read on the host, as TRL's pad-and-gather
    does). The selection itself reads the valid entropies out (a host sync, as TRL)."""
    if not 0.0 < top_quantile <= 1.0:
        raise ValueError(f"top_quantile must be in (0, 1], got {top_quantile}")
    mask = mask.bool()
    local = entropy.detach().float()[mask]
    values = local if process_group is None else _gather_ragged(local, process_group)
    if values.numel() == 0:
        return torch.zeros_like(mask)
    threshold = _quantile(values, 1.0 - top_quantile)
    return (torch.where(mask, entropy.detach().float(), 0) >= threshold) & mask


def _gather_ragged(local: Tensor, group) -> Tensor:
    import torch.distributed as dist

    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64, device=local.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([local.numel()], device=local.device), group=group)
    longest = int(max(s.item() for s in sizes))
    padded = torch.nn.functional.pad(local, (0, longest - local.numel()))
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])
