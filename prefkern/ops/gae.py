"""Generalized advantage estimation (GAE, and T-PPO's EGAE for truncated responses) on the GPU.

Replaces the loop over time every PPO trainer runs (verl's ``compute_gae_advantage_return``)
with one pass over the tokens: Triton and CUDA kernels scan each sequence backwards as an
affine recurrence; the torch backend does the same scan in log2(T) vectorized steps. See
:func:`prefkern.reference.gae_ref` for the loop that defines it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from prefkern import _checks
from prefkern.dispatch import resolve_backend
from prefkern.ops.suffix_scan import affine_suffix_scan, reverse_cummin
from prefkern.ops.whiten import masked_whiten

# CUDA-device preference, fastest first. Not yet measured on a GPU (benchmarks/bench_gae.py):
# both kernels read and write each token once; update from benchmarks/results/<gpu>/.
AUTO_ORDER = ("triton", "cuda")
_HALF_AND_SINGLE = (torch.float16, torch.bfloat16, torch.float32)


def _triton_gae(*args, **kwargs):
    from prefkern._kernels.gae import gae_scan

    return gae_scan(*args, **kwargs)


def _cuda_gae(*args, **kwargs):
    from prefkern import _cuda_gae

    return _cuda_gae.gae_scan(*args, **kwargs)


def torch_gae(rewards, values, mask=None, gammas=None, *, cu_seqlens=None, bootstrap=None,
              truncated=None, gamma: float = 1.0, lam: float = 0.95, lam_critic=None):
    """The torch backend (and CPU path): same arguments and outputs as the kernels'
    ``gae_scan``, fp32 (fp64 for fp64 inputs). O(B T log T) work, O(log T) launches."""
    dtype = torch.float64 if torch.float64 in (rewards.dtype, values.dtype) else torch.float32
    shape = rewards.shape
    packed = cu_seqlens is not None
    rows = 1 if packed else shape[0]
    length = rewards.numel() // max(rows, 1) if rows else 0
    if rewards.numel() == 0:
        empty = torch.zeros(shape, dtype=dtype, device=rewards.device)
        return empty, empty.clone()
    r = rewards.to(dtype).reshape(rows, length)
    v = values.to(dtype).reshape(rows, length)
    valid = (torch.ones_like(r, dtype=torch.bool) if mask is None
             else (mask != 0).reshape(rows, length))
    g = gamma if gammas is None else gammas.to(dtype).reshape(rows, length)
    device = r.device
    idx = torch.arange(length, device=device)
    if packed:
        cu = cu_seqlens.to(device=device, dtype=torch.int64)
        seq_start, seq_stop = cu[:-1], cu[1:]
        seq_of_token = torch.searchsorted(seq_stop, idx, right=True)
        tok_stop = seq_stop[seq_of_token][None]
    else:
        seq_start = torch.arange(rows, device=device) * length
        seq_stop = seq_start + length
        tok_stop = length

    # where the recurrence of each sequence starts: bootstrap value for truncated ones
    start_value = torch.zeros(seq_start.shape, dtype=dtype, device=device)
    if truncated is not None:
        if bootstrap is not None:
            boot = bootstrap.to(dtype)
        else:
            boot = _last_value(v, valid, seq_start, seq_stop, packed)
        start_value = torch.where(truncated != 0, boot, start_value)

    next_valid = F.pad(reverse_cummin(torch.where(valid, idx, length))[..., 1:], (0, 1),
                       value=length)
    in_sequence = next_valid < tok_stop
    start_tok = start_value[seq_of_token][None] if packed else start_value[:, None]
    next_value = torch.where(in_sequence, v.gather(-1, next_valid.clamp(max=length - 1)),
                             start_tok)
    delta = torch.where(valid, r + g * next_value - v, 0.0)
    # the last token of a sequence must not see the next sequence's running advantage
    keep = idx[None] != tok_stop - 1
    one = torch.ones((), dtype=dtype, device=device)
    adv = affine_suffix_scan(torch.where(valid, g * lam * one, one) * keep, delta)
    critic = adv
    if lam_critic is not None:
        critic = affine_suffix_scan(torch.where(valid, g * lam_critic * one, one) * keep, delta)
    ret = critic + v
    return adv.reshape(shape), ret.reshape(shape)


def _last_value(v, valid, seq_start, seq_stop, packed: bool):
    """(S,) V at the last valid token of each sequence; 0 for sequences without one."""
    length = v.shape[-1]
    idx = torch.arange(length, device=v.device)
    prev_valid = torch.cummax(torch.where(valid, idx, -1), dim=-1).values
    if packed:
        last = prev_valid[0, (seq_stop - 1).clamp(min=0)]
        ok = (seq_stop > seq_start) & (last >= seq_start)
        return torch.where(ok, v[0, last.clamp(min=0)], 0.0)
    last = prev_valid[:, -1]
    return torch.where(last >= 0, v.gather(1, last.clamp(min=0)[:, None])[:, 0], 0.0)


_IMPLS = {"triton": _triton_gae, "cuda": _cuda_gae, "torch": torch_gae}


# a torch.library custom op: opaque to torch.compile(fullgraph=True), with fake shapes
@torch.library.custom_op("prefkern::gae_scan", mutates_args=())
def _gae_op(rewards: Tensor, values: Tensor, mask: Tensor | None, gammas: Tensor | None,
            cu_seqlens: Tensor | None, bootstrap: Tensor | None, truncated: Tensor | None,
            backend: str, gamma: float, lam: float,
            lam_critic: float | None) -> tuple[Tensor, Tensor]:
    return _IMPLS[backend](rewards, values, mask, gammas, cu_seqlens=cu_seqlens,
                           bootstrap=bootstrap, truncated=truncated, gamma=gamma, lam=lam,
                           lam_critic=lam_critic)


@_gae_op.register_fake
def _(rewards, values, mask, gammas, cu_seqlens, bootstrap, truncated, backend, gamma, lam,
      lam_critic):
    dtype = torch.float64 if torch.float64 in (rewards.dtype, values.dtype) else torch.float32
    return rewards.new_empty(rewards.shape, dtype=dtype), rewards.new_empty(rewards.shape,
                                                                             dtype=dtype)


def _check_cu_seqlens(cu_seqlens: torch.Tensor, n_tokens: int) -> None:
    _checks.check_index("cu_seqlens", cu_seqlens)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D (B + 1,), got shape {tuple(cu_seqlens.shape)}")


def _screen_cu_seqlens(cu_seqlens: torch.Tensor, n_tokens: int):
    """-> (cu_seqlens every kernel can read in bounds, bad flag or None): it must start at 0,
    be non-decreasing and end at ``n_tokens``; a malformed one raises at once or (lazy) is
    clamped into shape and its outputs set to NaN (prefkern._checks)."""
    cu = cu_seqlens.to(torch.int64)
    bad = ((cu[0] != 0) | (cu[-1] != n_tokens) | (cu[1:] < cu[:-1]).any()).reshape(1)

    def describe():
        head = cu[:8].tolist()
        return (f"cu_seqlens must start at 0, be non-decreasing and end at the number of "
                f"tokens {n_tokens}; got {head}{'...' if cu.numel() > 8 else ''} ending at "
                f"{int(cu[-1])}")

    _checks.report(bad, "gae: malformed cu_seqlens", describe)
    if _checks.raises_now(cu.device):
        return cu_seqlens, None
    safe = cu.clamp(0, n_tokens).cummax(0).values
    safe = torch.cat([safe.new_zeros(1), safe[1:-1], safe.new_full((1,), n_tokens)])
    return safe.to(cu_seqlens.dtype), bad


def _check_inputs(rewards, values, mask, gamma, bootstrap, truncated, cu_seqlens) -> int:
    """Validates shapes/dtypes/devices; returns the number of sequences."""
    _checks.check_float("rewards", rewards)
    _checks.check_float("values", values)
    if values.shape != rewards.shape:
        raise ValueError(f"values shape {tuple(values.shape)} must equal rewards shape "
                         f"{tuple(rewards.shape)}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.shape != rewards.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} must equal rewards shape "
                             f"{tuple(rewards.shape)}")
    if isinstance(gamma, torch.Tensor):
        _checks.check_float("gamma", gamma)
        if gamma.shape != rewards.shape:
            raise ValueError(f"a per-token gamma must be shaped like rewards "
                             f"{tuple(rewards.shape)}, got {tuple(gamma.shape)}")
    if cu_seqlens is not None:
        if rewards.dim() != 1:
            raise ValueError(f"with cu_seqlens, inputs must be packed (N,), got shape "
                             f"{tuple(rewards.shape)}")
        _check_cu_seqlens(cu_seqlens, rewards.shape[0])
        n_seqs = cu_seqlens.numel() - 1
    else:
        if rewards.dim() != 2:
            raise ValueError(f"rewards must be (B, T) padded, or (N,) packed with cu_seqlens; "
                             f"got shape {tuple(rewards.shape)}")
        n_seqs = rewards.shape[0]
    if bootstrap is not None:
        _checks.check_float("bootstrap", bootstrap)
        if truncated is None:
            raise ValueError("bootstrap values apply to truncated sequences: pass truncated "
                             "(B,) bool as well (terminal sequences bootstrap with 0)")
        if bootstrap.shape != (n_seqs,):
            raise ValueError(f"bootstrap must be ({n_seqs},), got {tuple(bootstrap.shape)}")
    if truncated is not None:
        if not isinstance(truncated, torch.Tensor):
            raise TypeError(f"truncated must be a torch.Tensor, got {type(truncated).__name__}")
        if truncated.shape != (n_seqs,):
            raise ValueError(f"truncated must be ({n_seqs},), got {tuple(truncated.shape)}")
    _checks.check_same_device(rewards=rewards, values=values, mask=mask, bootstrap=bootstrap,
                              truncated=truncated, cu_seqlens=cu_seqlens,
                              gamma=gamma if isinstance(gamma, torch.Tensor) else None)
    return n_seqs


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None = None, *,
        gamma: float | torch.Tensor = 1.0, lam: float = 0.95,
        bootstrap: torch.Tensor | None = None, truncated: torch.Tensor | None = None,
        lam_critic: float | None = None, whiten: bool = False, process_group=None,
        cu_seqlens: torch.Tensor | None = None,
        backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and returns, backwards over each sequence in one pass:

        delta_t = r_t + gamma_t * V_next - V_t;   A_t = delta_t + gamma_t * lam * A_{t+1}
        returns = A(lam_critic if given else lam) + V

    ``V_next`` is V at the next valid token of the sequence. Positions with ``mask == 0``
    inside a sequence (tool/observation tokens) carry A and V_next through unchanged, exactly
    like verl's ``compute_gae_advantage_return``; at padding after the last valid token
    A = 0 and returns = V. The recurrence starts from A = 0 and V_next = 0 (terminal) or, for
    ``truncated`` sequences (EGAE, T-PPO), V_next = ``bootstrap[i]``, by default V at the
    sequence's last valid token. ``whiten`` applies verl's ``masked_whiten`` to the advantages:
    mean and unbiased var over the mask (all-reduced over ``process_group`` when given), applied
    at every position as verl does (multiply by the mask for zeros outside it).

    Args:
        rewards, values: (B, T) padded, or (N,) packed with ``cu_seqlens`` (B + 1,) int.
            bf16/fp16/fp32 (fp64 on the torch backend); they may differ in dtype.
        mask: same shape, nonzero = valid token (bool/int/float), or None (all valid).
        gamma: float, or a per-token discount shaped like rewards.
        bootstrap: (B,) float bootstrap values for the truncated sequences.
        truncated: (B,) bool, responses cut off mid-generation.
        lam_critic: lambda for the returns (critic targets) when it differs from ``lam``.
        backend: "auto" | "triton" | "cuda" | "torch" (None: $PREFKERN_BACKEND).
    Returns:
        (advantages, returns), fp32 (fp64 for fp64 inputs), shaped like rewards. Reference:
        :func:`prefkern.reference.gae_ref`.
    """
    _check_inputs(rewards, values, mask, gamma, bootstrap, truncated, cu_seqlens)
    gammas = gamma if isinstance(gamma, torch.Tensor) else None
    dtypes = {rewards.dtype, values.dtype} | ({gammas.dtype} if gammas is not None else set())
    implemented = ("triton", "cuda", "torch") if dtypes <= set(_HALF_AND_SINGLE) else ("torch",)
    name = resolve_backend("gae", backend, rewards.device, implemented,
                           AUTO_ORDER if len(implemented) > 1 else ())
    bad = None
    if cu_seqlens is not None:
        cu_seqlens, bad = _screen_cu_seqlens(cu_seqlens, rewards.shape[0])
    advantages, returns = _gae_op(
        rewards, values, mask, gammas, cu_seqlens, bootstrap, truncated, name,
        0.0 if gammas is not None else float(gamma), float(lam),
        None if lam_critic is None else float(lam_critic))
    if bad is not None:  # a malformed cu_seqlens poisons every output
        advantages, returns = (torch.where(bad, float("nan"), t) for t in (advantages, returns))
    if whiten:
        advantages = masked_whiten(advantages, mask, process_group=process_group)
    return advantages, returns
