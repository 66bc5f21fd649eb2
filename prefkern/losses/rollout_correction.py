"""Rollout importance weights: the correction for the mismatch between the inference engine
that sampled (vLLM: ``rollout_logprobs``) and the trainer's recomputed ``old_logprobs``
(Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training").
The weights are detached and go to ``policy_loss(..., is_weights=...)``.

Modes, with d = (old - rollout) on the mask and [low, high] the band:
  TRL (huggingface/trl f2cd577 grpo_trainer.py, ``vllm_importance_sampling_mode``):
    token_truncate     clamp(exp(d), low, high) per token (a None bound is open)
    token_mask         exp(d) per token, 0 outside [low, high]
    sequence_truncate  clamp(exp(sum_t d), low, high) for every token of the sequence
    sequence_mask      exp(sum_t d), 0 outside [low, high]
  OpenRLHF (OpenRLHF/OpenRLHF 3c3be62 models/loss.py ``vllm_is_correction_type``):
    tis                clamp(exp(d), low, high) per token (= token_truncate)
    icepop             exp(d), 0 outside [low, high] (= token_mask)
    seq-mask-tis       exp(d) per token (unclamped, as the code does), on sequences whose
                       geometric mean exp(mean_t d) lies in [low, high]; 0 elsewhere
"""

from __future__ import annotations

import torch
from torch import Tensor

from prefkern.losses.sequence import token_sums

MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "tis", "icepop",
         "seq-mask-tis")


def _in_band(w: Tensor, low: float | None, high: float | None) -> Tensor:
    ok = torch.ones_like(w, dtype=torch.bool)
    if low is not None:
        ok = ok & (w >= low)
    if high is not None:
        ok = ok & (w <= high)
    return ok


def rollout_is_weights(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, *,
                       mode: str = "sequence_mask", low: float | None = None,
                       high: float | None = 3.0, cu_seqlens: Tensor | None = None) -> Tensor:
    """Per-token rollout importance weights (see the module docstring), fp32, detached, shaped
    like the log-probs ((B, T), or packed (N,) with ``cu_seqlens``); 0 off the mask. The
    defaults are TRL's (sequence_mask, clip_min None, clip_max 3.0); OpenRLHF's band is
    low 0.5, high 5.0."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if old_logprobs.shape != rollout_logprobs.shape or mask.shape != old_logprobs.shape:
        raise ValueError("old_logprobs, rollout_logprobs and mask must have one shape")
    if mode in ("icepop", "seq-mask-tis", "tis") and (low is None or high is None):
        raise ValueError(f"mode {mode!r} needs both low and high (OpenRLHF's band)")
    mask = mask.bool()
    with torch.no_grad():
        # a missing (NaN) rollout log-prob counts as ratio 1, as TRL 1.16 does (nan_to_num)
        d = torch.nan_to_num(torch.where(mask, old_logprobs.float() - rollout_logprobs.float(),
                                         0), nan=0.0)
        if mode.startswith("sequence") or mode == "seq-mask-tis":
            sums, counts = token_sums(d, mask, cu_seqlens)
            per_seq = sums if mode.startswith("sequence") else sums / counts.clamp(min=1)
            seq_w = torch.exp(per_seq)
            seq_w = seq_w[_segment_of(d, cu_seqlens)] if cu_seqlens is not None else \
                seq_w[:, None].expand(d.shape)
        w = torch.exp(d)
        if mode in ("token_truncate", "tis"):
            w = w.clamp(min=low, max=high)
        elif mode in ("token_mask", "icepop"):
            w = torch.where(_in_band(w, low, high), w, 0)
        elif mode == "sequence_truncate":
            w = seq_w.clamp(min=low, max=high)
        elif mode == "sequence_mask":
            w = torch.where(_in_band(seq_w, low, high), seq_w, 0)
        else:  # seq-mask-tis
            w = torch.where(_in_band(seq_w, low, high), w, 0)
        return torch.where(mask, w, 0)


def _segment_of(tokens: Tensor, cu_seqlens: Tensor) -> Tensor:
    from prefkern.losses.sequence import _segment_ids

    seg = _segment_ids(cu_seqlens, tokens.numel())
    return seg.clamp(max=cu_seqlens.numel() - 2)
