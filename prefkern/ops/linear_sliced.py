"""Fast mode of linear_logprobs: cuBLAS GEMMs on vocab slices + Triton row kernels.

Forward, per slice c: raw_c = hidden @ W_c.T + b_c (N x C buffer), fold into running stats.
Backward, per slice: recompute raw_c, overwrite it with dz_c, then
    dW_c = dz_c.T @ hidden   (one GEMM over all tokens: exact fp32 accumulation in cuBLAS)
    dh  += dz_c @ W_c        (accumulated in an fp32 (N, H) buffer)
    db_c = dz_c.sum(0)
Peak extra memory: one N x C slice in the input dtype + fp32 dh; C is chosen so the slice stays
under SLICE_BYTES.
"""

from __future__ import annotations

import functools

import torch

from prefkern._kernels import logits_slice

SLICE_BYTES = 128 << 20


def _slice_width(n: int, vocab: int, elt: int) -> int:
    width = SLICE_BYTES // max(1, n * elt)
    if width >= vocab:
        return vocab
    return max(128, width // 128 * 128) if vocab > 128 else vocab


def _slices(n: int, vocab: int, elt: int):
    width = _slice_width(n, vocab, elt)
    for c0 in range(0, vocab, width):
        yield c0, min(vocab, c0 + width)


def _raw_logits(hidden, weight, bias, c0, c1):
    w = weight[c0:c1]
    return hidden @ w.T if bias is None else torch.addmm(bias[c0:c1], hidden, w.T)


@functools.cache
def _fp32_out_mm(device_type: str) -> str | None:
    """How this torch/device accumulates a half-precision product into fp32: "inplace"
    (addmm with out_dtype writing into the accumulator), "copy" (out_dtype, then a copy), or
    None (upcast the operands). Probed once, with the result checked."""
    if device_type != "cuda":
        return None
    a = torch.randn(64, 64, device=device_type).bfloat16()
    expected = a.float() @ a.float() + 1.0
    for mode in ("inplace", "copy"):
        acc = torch.ones(64, 64, device=device_type)
        try:
            if mode == "inplace":
                torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
            else:
                acc = torch.addmm(acc, a, a, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            continue
        if torch.allclose(acc, expected, rtol=1e-3, atol=1e-3):
            return mode
    return None


def _accumulate_mm(acc32, a, b):
    """acc32 += a @ b with fp32 accumulation and no rounding of the product to a's dtype."""
    if a.dtype == acc32.dtype:
        return acc32.addmm_(a, b)
    mode = _fp32_out_mm(a.device.type)
    if mode == "inplace":  # no (N, H) temporary
        return torch.addmm(acc32, a, b, out_dtype=torch.float32, out=acc32)
    if mode == "copy":
        return acc32.copy_(torch.addmm(acc32, a, b, out_dtype=torch.float32))
    return acc32.addmm_(a.float(), b.float())


def forward(hidden, weight, bias, targets, inv_temp, softcap, ignore_index):
    n = hidden.shape[0]
    stats = logits_slice.new_stats(n, hidden.device)
    for c0, c1 in _slices(n, weight.shape[0], hidden.element_size()):
        raw = _raw_logits(hidden, weight, bias, c0, c1)
        logits_slice.slice_stats_(raw, targets, c0, stats, inv_temp, softcap, ignore_index)
    m, s, u, zy = stats
    valid = targets != ignore_index
    log_s = torch.log(s)
    lse = m + log_s
    zero = torch.zeros_like(lse)
    return (torch.where(valid, zy - lse, zero), torch.where(valid, log_s - u / s, zero),
            torch.where(valid, lse, zero))


def backward(hidden, weight, bias, targets, lse, entropy, g_logp, g_ent, g_lse, inv_temp,
             softcap, ignore_index, need_dh=True, need_dw=True, need_db=True):
    n = hidden.shape[0]
    dh32 = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_dh else None
    dw = torch.empty_like(weight) if need_dw else None
    db = torch.empty_like(bias) if (need_db and bias is not None) else None
    for c0, c1 in _slices(n, weight.shape[0], hidden.element_size()):
        dz = _raw_logits(hidden, weight, bias, c0, c1)
        logits_slice.slice_grad_(dz, targets, c0, lse, entropy, g_logp, g_ent, g_lse, inv_temp,
                                 softcap, ignore_index)
        if need_dw:
            torch.mm(dz.T, hidden, out=dw[c0:c1])
        if need_dh:
            _accumulate_mm(dh32, dz, weight[c0:c1])
        if db is not None:
            db[c0:c1] = dz.sum(0, dtype=torch.float32).to(db.dtype)
    dh = None if dh32 is None else dh32.to(hidden.dtype)
    return dh, dw, db
