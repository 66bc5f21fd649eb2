"""Fast mode of linear_logprobs: cuBLAS GEMMs on vocab slices + Triton row kernels.

Forward, per slice c: z_c = hidden @ W_c.T + b_c written in fp32 (an fp32-output GEMM: the
logits are never rounded to the input dtype), folded into running statistics.
Backward, per slice: recompute z_c in fp32, write d loss / d z_c in the input dtype, then
    dW_c = dz_c.T @ hidden   (one GEMM over all tokens: fp32 accumulation in cuBLAS)
    dh  += dz_c @ W_c        (accumulated in an fp32 (N, H) buffer)
    db_c = dz_c.sum(0)
Peak extra memory: one (N, C) fp32 slice (+ an (N, C) input-dtype gradient slice for half
inputs) + the fp32 dh; C keeps the slices under SLICE_BYTES.
"""

from __future__ import annotations

import torch

from prefkern._kernels import logits_slice
from prefkern.ops import gemm, softmax_stats

SLICE_BYTES = 128 << 20


def _slice_width(n: int, vocab: int, bytes_per_logit: int) -> int:
    width = SLICE_BYTES // max(1, n * bytes_per_logit)
    if width >= vocab:
        return vocab
    return max(128, width // 128 * 128) if vocab > 128 else vocab


def _slices(n: int, vocab: int, dtype: torch.dtype):
    # an fp32 logits slice, plus its gradient in the input dtype when that is narrower
    per_logit = 4 + (0 if dtype == torch.float32 else torch.finfo(dtype).bits // 8)
    width = _slice_width(n, vocab, per_logit)
    for c0 in range(0, vocab, width):
        yield c0, min(vocab, c0 + width)


def _logits_fp32(hidden, weight, bias, c0, c1):
    z = gemm.fp32_mm(hidden, weight[c0:c1].T)
    return z if bias is None else z.add_(bias[c0:c1])


def raw(hidden, weight, bias, targets, inv_temp, softcap, ignore_index,
        with_entropy: bool = True, with_stats: bool = False) -> softmax_stats.RawStats:
    """The unfinished row statistics; the entropy term is computed whether asked or not (it
    costs the row kernel nothing)."""
    n, vocab = hidden.shape[0], weight.shape[0]
    stats = logits_slice.new_stats(n, hidden.device, extra=with_stats)
    for c0, c1 in _slices(n, vocab, hidden.dtype):
        z = _logits_fp32(hidden, weight, bias, c0, c1)
        logits_slice.slice_stats_(z, targets, c0, stats, inv_temp, softcap, ignore_index)
    return softmax_stats.RawStats(*stats[:4], tuple(stats[4:]) if with_stats else None)


def forward(hidden, weight, bias, targets, inv_temp, softcap, ignore_index,
            with_entropy: bool = True, with_stats: bool = False):
    """-> (logp, entropy, lse, (N, 4) extra statistics or None)."""
    stats = raw(hidden, weight, bias, targets, inv_temp, softcap, ignore_index, with_entropy,
                with_stats)
    return softmax_stats.finish_raw(stats, targets != ignore_index, weight.shape[0])


def backward(hidden, weight, bias, targets, lse, entropy, g_logp, g_ent, g_lse, inv_temp,
             softcap, ignore_index, need_dh=True, need_dw=True, need_db=True, g_extra=None,
             fp32_dh: bool = False):
    n = hidden.shape[0]
    dh32 = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_dh else None
    dw = torch.empty_like(weight) if need_dw else None
    db = torch.empty_like(bias) if (need_db and bias is not None) else None
    for c0, c1 in _slices(n, weight.shape[0], hidden.dtype):
        z = _logits_fp32(hidden, weight, bias, c0, c1)
        dz = z if hidden.dtype == torch.float32 else torch.empty_like(z, dtype=hidden.dtype)
        logits_slice.slice_grad_(z, dz, targets, c0, lse, entropy, g_logp, g_ent, g_lse,
                                 inv_temp, softcap, ignore_index, g_extra)
        if need_dw:
            torch.mm(dz.T, hidden, out=dw[c0:c1])
        if need_dh:
            gemm.accumulate_mm(dh32, dz, weight[c0:c1])
        if db is not None:
            db[c0:c1] = dz.sum(0, dtype=torch.float32).to(db.dtype)
    dh = dh32 if dh32 is None or fp32_dh else dh32.to(hidden.dtype)
    return dh, dw, db
