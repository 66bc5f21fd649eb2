"""Generalized advantage estimation as one reverse affine scan per sequence.

Backwards over a sequence, the state (N, G) -- N the value at the next valid token, G the
running advantage -- goes through one affine map per token:
    valid t:  N' = V_t   G' = (r_t - V_t) + g_t * N + g_t * lam * G
    masked t: N' = N     G' = G        (verl: observation tokens carry both through)
Such maps compose into maps of the same form, (a, b, c, d, e): N -> a N + b, G -> c N + d G + e,
so a chunk of BLOCK tokens is one tl.associative_scan. One program per sequence walks its
chunks from the end, carrying (N, G). A sixth component f (V at the first valid token met,
i.e. the LAST valid token in time) gives EGAE's default bootstrap in the same pass; a second
lambda (critic returns) adds its own (c, d, e).

Bytes per token: reads r, V (+ mask, per-token gamma), writes advantages and returns in fp32,
once each. The scan costs O(log BLOCK) FLOPs per token: far below the bandwidth bound.
"""

import torch
import triton
import triton.language as tl

from ._device import on_tensor_device

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _compose(a1, b1, c1, d1, e1, f1, a2, b2, c2, d2, e2, f2):
    # map 1 acts first (it covers later time steps), then map 2
    return (a2 * a1, a2 * b1 + b2, c2 * a1 + d2 * c1, d2 * d1, c2 * b1 + d2 * e1 + e2,
            tl.where(a1 == 0.0, f1, f2))


@triton.jit
def _compose_dual(a1, b1, c1, d1, e1, f1, p1, q1, s1, a2, b2, c2, d2, e2, f2, p2, q2, s2):
    # (p, q, s) play (c, d, e) for the critic's lambda
    a, b, c, d, e, f = _compose(a1, b1, c1, d1, e1, f1, a2, b2, c2, d2, e2, f2)
    return a, b, c, d, e, f, p2 * a1 + q2 * p1, q2 * q1, p2 * b1 + q2 * s1 + s2


@triton.jit
def _last_lane(x, is_last):
    return tl.sum(tl.where(is_last, x, 0.0), 0)


@triton.jit
def _gae_kernel(
    r_ptr, v_ptr, m_ptr, g_ptr, cu_ptr, boot_ptr, trunc_ptr, adv_ptr, ret_ptr,
    seq_len, gamma, lam, lam_critic,
    HAS_MASK: tl.constexpr, HAS_GAMMAS: tl.constexpr, PACKED: tl.constexpr,
    HAS_TRUNC: tl.constexpr, HAS_BOOT: tl.constexpr, FIND_LAST: tl.constexpr,
    DUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    seq = tl.program_id(0)
    if PACKED:
        start = tl.load(cu_ptr + seq).to(tl.int64)
        stop = tl.load(cu_ptr + seq + 1).to(tl.int64)
    else:
        start = seq.to(tl.int64) * seq_len
        stop = start + seq_len
    next_value = 0.0
    if HAS_TRUNC:
        truncated = tl.load(trunc_ptr + seq) != 0
        if HAS_BOOT:
            next_value = tl.where(truncated, tl.load(boot_ptr + seq).to(tl.float32), 0.0)
        else:
            searching = truncated
    run_adv = 0.0
    run_critic = 0.0
    lanes = tl.arange(0, BLOCK)
    is_last = lanes == BLOCK - 1
    for i in range(0, tl.cdiv(stop - start, BLOCK)):
        # lane k holds time stop-1-i*BLOCK-k: a forward scan over lanes runs backwards in time
        offs = stop - 1 - i * BLOCK - lanes
        inside = offs >= start
        r = tl.load(r_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        valid = inside
        if HAS_MASK:
            valid = valid & (tl.load(m_ptr + offs, mask=inside, other=0) != 0)
        if HAS_GAMMAS:
            g = tl.load(g_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        else:
            g = tl.zeros_like(r) + gamma
        a = tl.where(valid, 0.0, 1.0)
        b = tl.where(valid, v, 0.0)
        c = tl.where(valid, g, 0.0)
        d = tl.where(valid, g * lam, 1.0)
        e = tl.where(valid, r - v, 0.0)
        if DUAL:
            q = tl.where(valid, g * lam_critic, 1.0)
            A, B, C, D, E, F, P, Q, S = tl.associative_scan(
                (a, b, c, d, e, b, c, q, e), 0, _compose_dual)
        else:
            A, B, C, D, E, F = tl.associative_scan((a, b, c, d, e, b), 0, _compose)
        if FIND_LAST:
            # the first valid token met (backwards) is the sequence's last: bootstrap with its V
            a_chunk = _last_lane(A, is_last)
            next_value = tl.where(searching & (a_chunk == 0.0), _last_lane(F, is_last), next_value)
            searching = searching & (a_chunk != 0.0)
        adv = C * next_value + D * run_adv + E
        tl.store(adv_ptr + offs, adv, mask=inside)
        if DUAL:
            critic = P * next_value + Q * run_critic + S
            run_critic = _last_lane(critic, is_last)
        else:
            critic = adv
        tl.store(ret_ptr + offs, critic + v, mask=inside)
        run_adv = _last_lane(adv, is_last)
        next_value = _last_lane(A * next_value + B, is_last)


def _check_float(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} dtype {t.dtype} not supported by the Triton kernel")
    if t.shape != like.shape or t.device != like.device:
        raise ValueError(f"{name} must have shape {tuple(like.shape)} on {like.device}")


def _as_loadable(mask: torch.Tensor) -> torch.Tensor:
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


@on_tensor_device
def gae_scan(rewards, values, mask=None, gammas=None, *, cu_seqlens=None, bootstrap=None,
             truncated=None, gamma: float = 1.0, lam: float = 0.95, lam_critic=None,
             block: int | None = None):
    """rewards/values/mask/gammas (B, T), or flat (N,) with cu_seqlens (B + 1,) ->
    (advantages, returns), fp32, shaped like rewards. bootstrap/truncated: (B,) or None;
    bootstrap applies to truncated sequences only. block: tokens per scan chunk (power of 2)."""
    _check_float("values", values, rewards)
    _check_float("rewards", rewards, rewards)
    packed = cu_seqlens is not None
    if packed:
        if rewards.dim() != 1:
            raise ValueError("packed inputs (cu_seqlens given) must be flat (N,)")
        n_seqs, seq_len = cu_seqlens.numel() - 1, 0
    else:
        if rewards.dim() != 2:
            raise ValueError("padded inputs must be (B, T)")
        n_seqs, seq_len = rewards.shape
    if mask is not None and (mask.shape != rewards.shape or mask.device != rewards.device):
        raise ValueError("mask must be shaped like rewards, on the same device")
    if gammas is not None:
        _check_float("gammas", gammas, rewards)
    for name, t in (("bootstrap", bootstrap), ("truncated", truncated)):
        if t is not None and (t.shape != (n_seqs,) or t.device != rewards.device):
            raise ValueError(f"{name} must be ({n_seqs},) on {rewards.device}")
    if bootstrap is not None and truncated is None:
        raise ValueError("bootstrap applies to truncated sequences: pass truncated too")
    if block is None:
        block = 1024 if packed else max(16, min(triton.next_power_of_2(max(seq_len, 1)), 1024))
    if block & (block - 1):
        raise ValueError(f"block must be a power of 2, got {block}")

    rewards, values = rewards.contiguous(), values.contiguous()
    adv = torch.empty(rewards.shape, dtype=torch.float32, device=rewards.device)
    ret = torch.empty_like(adv)
    if n_seqs == 0 or rewards.numel() == 0:
        return adv, ret
    dummy = adv
    mask_arg = dummy if mask is None else _as_loadable(mask.contiguous())
    trunc_arg = dummy if truncated is None else _as_loadable(truncated.contiguous())
    _gae_kernel[(n_seqs,)](
        rewards, values, mask_arg, dummy if gammas is None else gammas.contiguous(),
        cu_seqlens.contiguous() if packed else dummy,
        dummy if bootstrap is None else bootstrap.contiguous(), trunc_arg, adv, ret,
        seq_len, float(gamma), float(lam), float(lam if lam_critic is None else lam_critic),
        HAS_MASK=mask is not None, HAS_GAMMAS=gammas is not None, PACKED=packed,
        HAS_TRUNC=truncated is not None, HAS_BOOT=bootstrap is not None,
        FIND_LAST=truncated is not None and bootstrap is None, DUAL=lam_critic is not None,
        BLOCK=block, num_warps=max(1, min(block // 256, 8)),
    )
    return adv, ret
