"""Per-sequence reductions of per-token values over padded (B, T) + mask or packed (N,) +
cu_seqlens layouts: the one helper every sequence-level loss uses. No host sync; gradients flow
back to the per-token values."""

from __future__ import annotations

import torch
from torch import Tensor

SEQUENCE_REDUCTIONS = ("sum", "mean", "constant")


def _segment_ids(cu_seqlens: Tensor, n: int) -> Tensor:
    """Sequence index of each of n packed tokens (tokens past cu_seqlens[-1] get B)."""
    positions = torch.arange(n, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)


def _check_layout(per_token: Tensor, mask: Tensor | None, cu_seqlens: Tensor | None) -> None:
    if mask is not None and mask.shape != per_token.shape:
        raise ValueError(f"mask must have the shape of the per-token values "
                         f"{tuple(per_token.shape)}, got {tuple(mask.shape)}")
    if cu_seqlens is not None:
        if per_token.dim() != 1 and not (per_token.dim() == 2 and per_token.shape[0] == 1):
            raise ValueError("packed values (cu_seqlens given) must be (N,) or (1, N)")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.dtype.is_floating_point:
            raise ValueError("cu_seqlens must be a 1-d integer tensor [0, l_0, l_0 + l_1, ...]")
    elif per_token.dim() != 2:
        raise ValueError("padded values must be (B, T) (or pass cu_seqlens for packed (N,))")


def token_sums(per_token: Tensor, mask: Tensor | None = None,
               cu_seqlens: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """-> (per-sequence sums of the values where mask holds, per-sequence token counts), (B,)
    each; padded: B = per_token.shape[0]; packed: B = len(cu_seqlens) - 1."""
    _check_layout(per_token, mask, cu_seqlens)
    keep = torch.ones_like(per_token, dtype=torch.bool) if mask is None else mask.bool()
    values = torch.where(keep, per_token, 0)
    if cu_seqlens is None:
        return values.sum(-1), keep.sum(-1)
    values, keep = values.reshape(-1), keep.reshape(-1)
    b = cu_seqlens.numel() - 1
    seg = _segment_ids(cu_seqlens, values.numel())
    inside = seg < b  # tokens past the last sequence count nowhere
    seg = torch.where(inside, seg, 0)
    sums = values.new_zeros(b).index_add(0, seg, torch.where(inside, values, 0))
    counts = torch.zeros(b, dtype=torch.int64, device=values.device).index_add(
        0, seg, (keep & inside).long())
    return sums, counts


def sequence_reduce(per_token: Tensor, mask: Tensor | None = None, *,
                    cu_seqlens: Tensor | None = None, reduction: str = "sum",
                    normalizer: float | None = None) -> Tensor:
    """Per-sequence reduction -> (B,):
      sum       ``(x * mask).sum(-1)``            (DPO's sequence log-prob)
      mean      ``sum / mask.sum(-1).clamp(min=1)``  (1/|y|: SimPO, IPO, ORPO)
      constant  ``sum / normalizer``              (Dr. GRPO-style fixed normalizer)
    over padded (B, T) values with a (B, T) mask, or packed (N,) values with cu_seqlens (B + 1,)
    (and an optional (N,) mask, e.g. the completion tokens)."""
    if reduction not in SEQUENCE_REDUCTIONS:
        raise ValueError(f"reduction must be one of {SEQUENCE_REDUCTIONS}, got {reduction!r}")
    sums, counts = token_sums(per_token, mask, cu_seqlens)
    if reduction == "sum":
        return sums
    if reduction == "constant":
        if normalizer is None or not normalizer > 0:
            raise ValueError("reduction='constant' needs a normalizer > 0")
        return sums / normalizer
    return sums / counts.clamp(min=1).to(sums.dtype)


def _positions(keep: Tensor, cu_seqlens: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """1-based position of each kept token among its sequence's kept tokens, and (packed) the
    sequence index of each token."""
    if cu_seqlens is None:
        return keep.long().cumsum(-1), None
    flat = keep.reshape(-1).long()
    b = cu_seqlens.numel() - 1
    seg = _segment_ids(cu_seqlens, flat.numel())
    running = flat.cumsum(0)
    starts = torch.cat([running.new_zeros(1), running])[cu_seqlens[:-1].clamp(max=flat.numel())]
    return running - starts[seg.clamp(max=max(b - 1, 0))], seg


def ld_token_sums(per_token: Tensor, mask: Tensor | None, cu_seqlens: Tensor | None,
                  ld_alpha: float) -> Tensor:
    """LD-DPO's sequence log-probs of TRL's concatenated batch (B chosen then B rejected
    sequences, padded (2B, T) or packed with cu_seqlens (2B + 1,)): with L the shorter
    completion of each pair, the first L completion tokens count fully and the rest
    ``ld_alpha`` times -> (2B,)."""
    _check_layout(per_token, mask, cu_seqlens)
    keep = torch.ones_like(per_token, dtype=torch.bool) if mask is None else mask.bool()
    counts = token_sums(per_token, keep, cu_seqlens)[1]
    if counts.numel() % 2:
        raise ValueError("LD-DPO needs B chosen then B rejected sequences")
    half = counts.numel() // 2
    shared = torch.minimum(counts[:half], counts[half:]).repeat(2)
    pos, seg = _positions(keep, cu_seqlens)
    if seg is None:
        limit = shared[:, None]
    else:
        limit = shared[seg.clamp(max=counts.numel() - 1)].view(keep.shape)
    head = keep & (pos.view(keep.shape) <= limit)
    return (token_sums(per_token, head, cu_seqlens)[0]
            + ld_alpha * token_sums(per_token, keep & ~head, cu_seqlens)[0])


def ld_sequence_logps(chosen: Tensor, chosen_mask: Tensor, rejected: Tensor,
                      rejected_mask: Tensor, ld_alpha: float) -> tuple[Tensor, Tensor]:
    """LD-DPO's length-desensitized sequence log-probs (Liu et al. 2024, "LD-DPO"; TRL
    ``ld_alpha``, huggingface/trl f2cd577 dpo_trainer.py): with L the shorter completion of
    each pair, the first L completion tokens count fully and the rest ``ld_alpha`` times:
    ``pos = mask.cumsum(-1); logp = (x * (mask & (pos <= L))).sum(-1) + ld_alpha *
    (x * (mask & (pos > L))).sum(-1)``. chosen / rejected: padded (B, T) per-token values
    with their masks -> (chosen (B,), rejected (B,))."""
    for x, m in ((chosen, chosen_mask), (rejected, rejected_mask)):
        _check_layout(x, m, None)
    width = max(chosen.shape[-1], rejected.shape[-1])
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[-1]))  # noqa: E731
    both = ld_token_sums(torch.cat([pad(chosen), pad(rejected)]),
                         torch.cat([pad(chosen_mask.bool()), pad(rejected_mask.bool())]), None,
                         ld_alpha)
    return both[: chosen.shape[0]], both[chosen.shape[0]:]


def wpo_weights(token_logps: Tensor, sum_p2: Tensor, mask: Tensor | None = None,
                cu_seqlens: Tensor | None = None) -> Tensor:
    """WPO's per-sequence weights (Zhou et al. 2024, "WPO", Eq. 2; TRL ``use_weighting``,
    huggingface/trl f2cd577 dpo_trainer.py), detached:
    ``exp(((logp - log sum_v p_v^2) * mask).sum(-1) / mask.sum(-1).clamp(min=1))`` over the
    completion tokens; sum_p2 per token from ``linear_logprobs(..., return_stats=True)``.
    The pair weight is chosen * rejected (preference_loss's chosen_weights / rejected_weights)."""
    with torch.no_grad():
        adjusted = token_logps.double() - torch.log(sum_p2.double())
        sums, counts = token_sums(adjusted, mask, cu_seqlens)
        return torch.exp(sums / counts.clamp(min=1)).to(token_logps.dtype)
