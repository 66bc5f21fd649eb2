"""Outcome advantage estimators over groups of responses (GRPO, Dr.GRPO, RLOO, OPO, GPG,
REINFORCE++(-baseline), ReMax), vectorized: per-group statistics are segment sums over a dense
group index built by sorting, so there is no Python loop over groups and no host sync.
The loops that define them: :func:`prefkern.reference.group_advantages_ref`.
"""

from __future__ import annotations

import torch

from prefkern import _checks
from prefkern.ops.suffix_scan import affine_suffix_scan
from prefkern.ops.whiten import masked_whiten
from prefkern.reference.advantages import GROUP_METHODS

_NEEDS_GROUPS = ("grpo", "dr_grpo", "rloo", "opo", "gpg", "reinforce_pp_baseline")


def dense_group_index(group_ids: torch.Tensor) -> torch.Tensor:
    """(B,) any integer ids -> (B,) int64 ids in [0, number of groups), equal ids mapping to
    equal indices, without a host sync (sort, mark where the sorted id changes, cumsum)."""
    ids = group_ids.reshape(-1).to(torch.int64)
    sorted_ids, order = torch.sort(ids)
    starts = torch.ones_like(sorted_ids, dtype=torch.int64)
    starts[1:] = (sorted_ids[1:] != sorted_ids[:-1]).to(torch.int64)
    dense = torch.empty_like(ids)
    dense[order] = torch.cumsum(starts, 0) - 1
    return dense


def _group_sum(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Per-sample sum of x over the sample's group, in float64 (B is small; float64 makes the
    atomic summation order immaterial at the output precision)."""
    sums = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    return sums.index_add_(0, index, x.to(torch.float64))[index]


def _check(scores, group_ids, method, mask, baseline) -> None:
    if method not in GROUP_METHODS:
        raise ValueError(f"method must be one of {GROUP_METHODS}, got {method!r}")
    _checks.check_float("scores", scores)
    if scores.dim() not in (1, 2):
        raise ValueError(f"scores must be (B,) outcome scores or (B, T) token-level rewards, "
                         f"got shape {tuple(scores.shape)}")
    n = scores.shape[0]
    if method in _NEEDS_GROUPS:
        if group_ids is None:
            raise ValueError(f"method {method!r} needs group_ids (B,)")
        _checks.check_index("group_ids", group_ids)
        if group_ids.shape != (n,):
            raise ValueError(f"group_ids must be ({n},), got {tuple(group_ids.shape)}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.dim() != 2 or mask.shape[0] != n or (scores.dim() == 2 and
                                                     mask.shape != scores.shape):
            raise ValueError(f"mask must be (B, T) matching scores {tuple(scores.shape)}, got "
                             f"{tuple(mask.shape)}")
    if method == "reinforce_pp" and scores.dim() != 2:
        raise ValueError("reinforce_pp discounts token-level rewards: scores must be (B, T)")
    if method == "opo" and mask is None and scores.dim() != 2:
        raise ValueError("opo weights the baseline by response length: pass mask (B, T)")
    if method == "remax":
        if baseline is None:
            raise ValueError("remax needs baseline (B,): the greedy response's score")
        _checks.check_float("baseline", baseline)
        if baseline.shape != (n,):
            raise ValueError(f"baseline must be ({n},), got {tuple(baseline.shape)}")
    _checks.check_same_device(scores=scores, group_ids=group_ids, mask=mask, baseline=baseline)


def gather_rows(group, *tensors: torch.Tensor | None):
    """All-gather each tensor's rows over ``group`` (data parallel: every rank the same number
    of rows, ranks in batch order; None stays None) -> (the gathered tensors..., this rank's
    row slice of them). No autograd: the gathered copies are detached."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(group), dist.get_rank(group)

    def gather(t):
        if t is None:
            return None
        out = t.new_empty((world * t.shape[0], *t.shape[1:]))
        dist.all_gather_into_tensor(out, t.detach().contiguous(), group=group)
        return out

    b = tensors[0].shape[0]
    return (*(gather(t) for t in tensors), slice(rank * b, (rank + 1) * b))


@torch.no_grad()
def group_advantages(scores: torch.Tensor, group_ids: torch.Tensor | None = None, *,
                     method: str, eps: float = 1e-6, mask: torch.Tensor | None = None,
                     baseline: torch.Tensor | None = None, gamma: float = 1.0,
                     process_group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Outcome advantages of verl's estimators, for any integer group ids (prompt uids).

    With s = scores (or token-level rewards summed over T) and per group mean/std (torch.std,
    unbiased; a group of one has mean 0 and std 1):
        grpo     (s - mean) / (std + eps)     dr_grpo  s - mean
        rloo     n/(n-1) (s - mean), groups of one keep s
        opo      s - sum(len s) / sum(len) over the group, len = mask.sum(-1)
        gpg      B / max(#(s != 0), 1) * (s - mean)
        reinforce_pp_baseline  masked_whiten((s - mean) * mask) * mask
        reinforce_pp  R_t = r_t + gamma R_{t+1} on valid tokens, R_t = R_{t+1} on masked ones
                 (a multi-turn observation span carries the return through: verl 1dda039 and
                 0.9.1), returns = R * mask; advantages masked_whiten(returns) * mask
        remax    returns = reverse cumsum of r * mask; advantages = returns - baseline * mask
    Outcome advantages are broadcast over tokens times ``mask`` when it is given (or scores is
    (B, T)), else returned per sample. ``process_group`` (data parallel, every rank the same
    B, ranks in batch order): the group statistics are those of the whole batch, a group's
    samples on any ranks (one all-gather of B scores and ids, and of the lengths for opo; gpg
    counts the whole batch), and the reinforce_pp methods whiten over the group; no host sync.

    Args:
        scores: (B,) or (B, T) float. group_ids: (B,) integer, any values (unused by
        reinforce_pp and remax). mask: (B, T), nonzero = response token. baseline: (B,)
        (remax). gamma: reinforce_pp's discount.
    Returns:
        (advantages, returns), fp32 (fp64 for fp64 scores); returns == advantages except for
        reinforce_pp and remax. Reference: :func:`prefkern.reference.group_advantages_ref`.
    """
    _check(scores, group_ids, method, mask, baseline)
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    x = scores.to(dtype)
    token_level = x.dim() == 2
    if mask is None and token_level:
        mask = torch.ones_like(x)
    mask_f = None if mask is None else (mask != 0).to(dtype)

    if method == "reinforce_pp":
        # valid tokens discount, masked ones (observations) carry the return unchanged
        returns = affine_suffix_scan(1.0 + (gamma - 1.0) * mask_f, x * mask_f) * mask_f
        return masked_whiten(returns, mask_f, process_group=process_group) * mask_f, returns
    if method == "remax":
        if token_level:
            returns = (x * mask_f).flip(-1).cumsum(-1).flip(-1)
            return returns - baseline.to(dtype)[:, None] * mask_f, returns
        base = baseline.to(dtype)
        if mask_f is not None:
            x, base = x[:, None] * mask_f, base[:, None] * mask_f
        return x - base, x

    s = x.sum(-1) if token_level else x
    lengths = None if mask_f is None else mask_f.sum(-1)
    rows = None
    if process_group is not None:  # the whole batch's groups, then this rank's rows
        s, group_ids, lengths, rows = gather_rows(process_group, s, group_ids, lengths)
    group = dense_group_index(group_ids)
    n = _group_sum(torch.ones_like(s), group)
    s64 = s.to(torch.float64)
    many = n > 1
    mean = torch.where(many, _group_sum(s, group) / n, 0.0)
    if method == "grpo":
        std = torch.sqrt(_group_sum((s64 - mean) ** 2, group) / (n - 1).clamp(min=1))
        adv = (s64 - mean) / (torch.where(many, std, 1.0) + eps)
    elif method in ("dr_grpo", "reinforce_pp_baseline"):
        adv = s64 - mean
    elif method == "rloo":
        adv = torch.where(many, (s64 - mean) * n / (n - 1).clamp(min=1), s64)
    elif method == "gpg":
        alpha = s.shape[0] / torch.count_nonzero(s).clamp(min=1).to(torch.float64)
        adv = alpha * (s64 - mean)
    else:  # opo
        total_len = _group_sum(lengths, group)
        weighted = _group_sum(lengths * s, group)
        adv = s64 - torch.where(many & (total_len > 0), weighted / total_len.clamp(min=1e-30), 0.0)
    adv = adv.to(dtype)
    if rows is not None:
        adv = adv[rows]

    if method == "reinforce_pp_baseline":
        tiled = adv if mask_f is None else adv[:, None] * mask_f
        out = masked_whiten(tiled, mask_f, process_group=process_group)
        out = out if mask_f is None else out * mask_f
        return out, out
    out = adv if mask_f is None else adv[:, None] * mask_f
    return out, out
