"""Typed wrappers around prefkern._C: the extension takes raw pointers, sizes and a stream, so it
never links against the torch C++ ABI. Callers have validated shapes and dtypes already."""

from __future__ import annotations

import torch

# torch only, no triton (importing it runs kernels/__init__.py and kernels/_device.py)
from prefkern._kernels._device import on_tensor_device

# Must match csrc/common.cuh::DType.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _ext():
    from prefkern import _C

    return _C


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _dtype_code(t: torch.Tensor) -> int:
    if t.dtype not in DTYPE_CODES:
        raise TypeError(f"the CUDA backend supports {list(DTYPE_CODES)}, got {t.dtype}")
    return DTYPE_CODES[t.dtype]


def _temperature(inv_temp) -> tuple[float, int]:
    """(scalar factor, pointer to (N,) fp32 per-row factors or 0)."""
    if isinstance(inv_temp, torch.Tensor):
        return 1.0, _ptr(inv_temp)
    return float(inv_temp), 0


@on_tensor_device
def logprobs_fwd(logits, targets, inv_temp, ignore_index: int, with_entropy: bool = True,
                 with_stats: bool = False):
    """logits (N, V) unit stride on V, targets (N,) -> (logp, entropy or None, lse) fp32 and
    with_stats the (N, 4) fp32 [sum p^2, mean logit, max logit, target is argmax] (else None).
    inv_temp: a float or (N,) fp32 contiguous per-row factors."""
    n, v = logits.shape
    targets = targets.to(torch.int64).contiguous()
    logp = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if with_entropy else None
    stats = torch.empty((n, 4), dtype=torch.float32, device=logits.device) if with_stats \
        else None
    _ext().logprobs_from_logits_fwd(
        _ptr(logits), logits.stride(0), _ptr(targets), _ptr(logp), _ptr(entropy), _ptr(lse),
        _ptr(stats), n, v, *_temperature(inv_temp), int(ignore_index), _dtype_code(logits),
        _stream(logits.device))
    return logp, entropy, lse, stats


@on_tensor_device
def logprobs_bwd(logits, targets, lse, entropy, g_logp, g_ent, g_lse, inv_temp, ignore_index: int,
                 inplace: bool = False, g_extra=None):
    """-> dlogits (N, V): a new tensor, or (inplace) logits itself, overwritten (each thread
    reads its elements before it writes them). g_extra: (N, 2) fp32 [g_sq, g_const] or None."""
    n, v = logits.shape
    targets = targets.to(torch.int64).contiguous()
    grad = logits if inplace else torch.empty((n, v), dtype=logits.dtype, device=logits.device)
    _ext().logprobs_from_logits_bwd(
        _ptr(logits), logits.stride(0), _ptr(targets), _ptr(lse), _ptr(entropy), _ptr(g_logp),
        _ptr(g_ent), _ptr(g_lse), _ptr(g_extra), _ptr(grad), grad.stride(0), n, v,
        *_temperature(inv_temp), int(ignore_index), _dtype_code(logits), _stream(logits.device))
    return grad
