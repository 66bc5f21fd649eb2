"""Typed wrapper around prefkern._C.gae_scan (csrc/gae.cu): converts the optional inputs to
the layouts the kernel reads (uint8 masks, fp32 gammas/bootstrap, int64 cu_seqlens), allocates
the outputs and launches on the inputs' device and its current stream. Callers have validated
shapes already."""

from __future__ import annotations

import torch

from prefkern._cuda import _dtype_code, _ext, _ptr, _stream
from prefkern._kernels._device import on_tensor_device


def _as_uint8(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    if t.dtype == torch.bool:
        return t.contiguous().view(torch.uint8)
    return (t != 0).view(torch.uint8).contiguous()


def _as(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype).contiguous()


@on_tensor_device
def gae_scan(rewards, values, mask=None, gammas=None, *, cu_seqlens=None, bootstrap=None,
             truncated=None, gamma: float = 1.0, lam: float = 0.95, lam_critic=None):
    """Same contract as prefkern._kernels.gae.gae_scan: (B, T), or (N,) with cu_seqlens ->
    (advantages, returns) fp32. rewards and values of different dtypes are promoted to one."""
    if bootstrap is not None and truncated is None:
        raise ValueError("bootstrap applies to truncated sequences: pass truncated too")
    dtype = torch.promote_types(rewards.dtype, values.dtype)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        dtype = torch.float32
    r, v = _as(rewards, dtype), _as(values, dtype)
    if cu_seqlens is not None:
        n_seqs, seq_len = cu_seqlens.numel() - 1, 0
    else:
        n_seqs, seq_len = rewards.shape
    adv = torch.empty(rewards.shape, dtype=torch.float32, device=rewards.device)
    ret = torch.empty_like(adv)
    if n_seqs == 0 or rewards.numel() == 0:
        return adv, ret
    mask_u8, trunc_u8 = _as_uint8(mask), _as_uint8(truncated)
    gammas_f, boot_f = _as(gammas, torch.float32), _as(bootstrap, torch.float32)
    cu = _as(cu_seqlens, torch.int64)
    lam_c = lam if lam_critic is None else lam_critic
    _ext().gae_scan(
        _ptr(r), _ptr(v), _ptr(mask_u8), _ptr(gammas_f), _ptr(cu), _ptr(boot_f), _ptr(trunc_u8),
        _ptr(adv), _ptr(ret), n_seqs, seq_len, float(gamma), float(lam), float(lam_c),
        lam_critic is not None, _dtype_code(r), _stream(rewards.device))
    return adv, ret
