"""Reward shaping before advantage estimation: KL-in-reward, and PPO-max's running-moments
reward normalization with clipping. Vectorized, no host sync; references in
:mod:`prefkern.reference.advantages`.
"""

from __future__ import annotations

import torch

from prefkern import _checks
from prefkern.ops.kl_estimate import kl_estimate
from prefkern.ops.whiten import masked_moments


def _last_valid_index(valid: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """(S,) flat index of each sequence's last valid token, -1 for a sequence without one."""
    if cu_seqlens is None:
        rows, length = valid.shape
        idx = torch.arange(length, device=valid.device)
        last = torch.where(valid, idx, -1).amax(-1) if length else torch.full(
            (rows,), -1, device=valid.device)
        return torch.where(last >= 0, last + torch.arange(rows, device=valid.device) * length, -1)
    cu = cu_seqlens.to(device=valid.device, dtype=torch.int64)
    idx = torch.arange(valid.numel(), device=valid.device)
    seq = torch.searchsorted(cu[1:], idx, right=True)
    last = torch.full((cu.numel() - 1,), -1, dtype=torch.int64, device=valid.device)
    return last.scatter_reduce(0, seq, torch.where(valid, idx, -1), "amax")


@torch.no_grad()
def kl_penalized_rewards(scores: torch.Tensor, logprobs: torch.Tensor,
                         ref_logprobs: torch.Tensor, mask: torch.Tensor | None = None, *,
                         kl_coef: float, cu_seqlens: torch.Tensor | None = None,
                         score_clip: tuple[float, float] | None = None, kl_kind: str = "k1",
                         kl_input_clamp: float | None = None,
                         kl_output_clamp: float | None = None) -> torch.Tensor:
    """Token rewards with the KL penalty in the reward (PPO-RLHF):

        r_t = -kl_coef * kl_t * m_t  [+ scores_i at sequence i's last valid token]

    with ``kl_t = kl_estimate(logp_t, ref_logp_t, kl_kind, input_clamp=kl_input_clamp,
    output_clamp=kl_output_clamp)`` (default k1 = logp - ref, unclamped: verl's
    apply_kl_penalty with kl_penalty="kl"; OpenRLHF's compute_approx_kl clamps every estimator
    to +-10: ``kl_output_clamp=10.0``).

    Outcome ``scores`` (B,) go on the last valid token (OpenRLHF's ``compute_reward``),
    clamped to ``score_clip`` when given; token-level ``scores`` shaped like ``logprobs`` are
    added everywhere (verl's ``token_level_scores - beta * kl``).

    Args:
        scores: (B,) or shaped like logprobs. logprobs, ref_logprobs: (B, T), or (N,) packed
        with ``cu_seqlens`` (B + 1,). mask: shaped like logprobs, nonzero = response token.
    Returns:
        rewards shaped like logprobs, fp32 (fp64 for fp64 inputs); 0 outside the mask.
    """
    _checks.check_float("scores", scores)
    _checks.check_float("logprobs", logprobs)
    _checks.check_float("ref_logprobs", ref_logprobs)
    if ref_logprobs.shape != logprobs.shape:
        raise ValueError(f"ref_logprobs shape {tuple(ref_logprobs.shape)} must equal logprobs "
                         f"shape {tuple(logprobs.shape)}")
    if mask is not None and mask.shape != logprobs.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal logprobs shape "
                         f"{tuple(logprobs.shape)}")
    if cu_seqlens is not None:
        _checks.check_index("cu_seqlens", cu_seqlens)
        if logprobs.dim() != 1 or cu_seqlens.dim() != 1:
            raise ValueError("with cu_seqlens, logprobs must be packed (N,) and cu_seqlens (B+1,)")
        n_seqs = cu_seqlens.numel() - 1
    else:
        if logprobs.dim() != 2:
            raise ValueError(f"logprobs must be (B, T), or (N,) with cu_seqlens; got "
                             f"{tuple(logprobs.shape)}")
        n_seqs = logprobs.shape[0]
    token_level = scores.shape == logprobs.shape
    if not token_level and scores.shape != (n_seqs,):
        raise ValueError(f"scores must be ({n_seqs},) outcome scores or shaped like logprobs "
                         f"{tuple(logprobs.shape)}, got {tuple(scores.shape)}")
    _checks.check_same_device(scores=scores, logprobs=logprobs, ref_logprobs=ref_logprobs,
                              mask=mask, cu_seqlens=cu_seqlens)

    dtype = torch.float64 if torch.float64 in (logprobs.dtype, ref_logprobs.dtype,
                                               scores.dtype) else torch.float32
    valid = torch.ones_like(logprobs, dtype=torch.bool) if mask is None else mask != 0
    kl = kl_estimate(logprobs.to(dtype), ref_logprobs.to(dtype), kl_kind,
                     input_clamp=kl_input_clamp, output_clamp=kl_output_clamp)
    rewards = torch.where(valid, -kl_coef * kl, 0.0)
    if token_level:
        return rewards + scores.to(dtype)
    if rewards.numel() == 0:  # no token to carry the outcome score
        return rewards
    s = scores.to(dtype)
    if score_clip is not None:
        s = s.clamp(min=score_clip[0], max=score_clip[1])
    last = _last_valid_index(valid, cu_seqlens)
    # sequences without a valid token add 0 at index 0
    flat = rewards.reshape(-1).index_add(0, last.clamp(min=0), torch.where(last >= 0, s, 0.0))
    return flat.reshape(logprobs.shape)


class RunningMoments:
    """Running count, mean and unbiased std of every value passed to :meth:`update`, kept as
    float64 device tensors (no host sync). Batches merge exactly (Chan et al.'s parallel
    formula), so the result equals the statistics of all values seen; with ``process_group``
    each batch's (count, sum, sum of squares) is all-reduced first. Before two values are seen
    the std is 1. Mirrors the RunningMoments of TRL / MOSS-RLHF (PPO-max) without their
    ``.item()`` calls.
    """

    def __init__(self, process_group=None):
        self.process_group = process_group
        self.count: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None
        self._m2: torch.Tensor | None = None

    @torch.no_grad()
    def update(self, values: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Adds the values (those with ``mask != 0`` when a mask is given)."""
        _checks.check_float("values", values)
        if self.count is None:
            zero = torch.zeros((), dtype=torch.float64, device=values.device)
            self.count, self.mean, self._m2 = zero, zero.clone(), zero.clone()
        # two passes: squares taken around the batch's own mean, so no precision is lost to
        # (mean / std)^2 cancellation (one more reduction; still no host sync)
        x = values.to(torch.float64)
        n, total, _ = masked_moments(x, mask, self.process_group)
        batch_mean = total / n.clamp(min=1)
        _, _, m2_batch = masked_moments(x - batch_mean, mask, self.process_group)
        delta = batch_mean - self.mean
        merged = self.count + n
        self._m2 = self._m2 + m2_batch + delta * delta * self.count * n / merged.clamp(min=1)
        self.mean = self.mean + delta * n / merged.clamp(min=1)
        self.count = merged

    @property
    def var(self) -> torch.Tensor:
        """Unbiased variance of the values seen (1 before two values)."""
        if self.count is None:
            return torch.ones((), dtype=torch.float64)
        return torch.where(self.count > 1, self._m2 / (self.count - 1).clamp(min=1), 1.0)

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self._m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self._m2 = state["count"], state["mean"], state["m2"]


@torch.no_grad()
def normalize_rewards(rewards: torch.Tensor, moments: RunningMoments, *,
                      mask: torch.Tensor | None = None, update: bool = True,
                      center: bool = True, clip: float | None = None,
                      eps: float = 1e-8) -> torch.Tensor:
    """PPO-max reward normalization: update ``moments`` with this batch (``update``), then

        out = clamp((r - mean) / (std + eps), -clip, clip)   (``center=False``: r / (std + eps))

    with the running mean/std of all rewards seen. ``mask`` selects the values that enter
    the statistics; positions outside it come back as 0. Returns fp32 (fp64 for fp64 rewards).
    Reference: :func:`prefkern.reference.normalize_rewards_ref`.
    """
    if mask is not None and mask.shape != rewards.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal rewards shape "
                         f"{tuple(rewards.shape)}")
    if update:
        moments.update(rewards, mask)
    if moments.count is None:
        raise ValueError("moments has seen no values: call with update=True first")
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    r = rewards.to(torch.float64)  # in fp64, rounded once at the end
    if center:
        r = r - moments.mean
    out = r / (moments.std + eps)
    if clip is not None:
        out = out.clamp(min=-clip, max=clip)
    if mask is not None:
        out = torch.where(mask != 0, out, 0.0)
    return out.to(dtype)
