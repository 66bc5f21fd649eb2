"""The Triton passes of linear_divergence ("fast" mode): cuBLAS GEMMs write raw fp32 logits,
Triton row kernels (prefkern._kernels.divergence) apply both heads and the divergence algebra.

Forward, per chunk of rows: raw_p, raw_q (r, V) fp32 (one fp32-output GEMM per side), then one
kernel: row statistics, D, the target log-prob. FLOPs 2NHV per side.
Backward, per vocabulary slice over all rows: raw_p, raw_q (N, C) fp32 recomputed, one kernel
writes d loss / d raw logits in the input dtype (the only rounding: the GEMM input), then
dW_c = dz.T @ h (complete for the slice), dh += dz @ W_c in fp32, db_c = dz.sum(0).
FLOPs 2NHV recompute per side + 4NHV per side that takes a gradient. Peak extra memory: one
slice of each side's logits (SLICE_BYTES each) + the fp32 dh.
"""

from __future__ import annotations

import torch

from prefkern._kernels import divergence as kernels
from prefkern.ops.divergence_passes import HeadArgs, SideGrads, mixed_logits
from prefkern.ops.linear_sliced import SLICE_BYTES
from prefkern.reference.divergence import Divergence


def _rows_head(head: HeadArgs, rows: slice):
    factor = head.factor[rows] if isinstance(head.factor, torch.Tensor) else head.factor
    return factor, head.softcap


def forward(policy, refs, targets, head_p: HeadArgs, head_q: HeadArgs, div: Divergence,
            ignore_index: int, need_q: bool):
    """-> [D, logp, m_p, log_s_p, m_q, log_s_q, c_p, c_q], each (N,) fp32."""
    n, v = policy.hidden.shape[0], policy.weight.shape[0]
    device = policy.hidden.device
    outs = [torch.empty(n, dtype=torch.float32, device=device) for _ in range(8)]
    step = max(1, SLICE_BYTES // (4 * v))
    every = slice(None)
    for r0 in range(0, n, step):
        rows = slice(r0, min(n, r0 + step))
        raw_p = mixed_logits([policy], rows, every, torch.float32)
        raw_q = mixed_logits(refs, rows, every, torch.float32)
        parts = kernels.divergence_fwd(raw_p, raw_q, targets[rows], _rows_head(head_p, rows),
                                       _rows_head(head_q, rows), div.kind, div.beta, div.alpha,
                                       ignore_index, need_q)
        for out, part in zip(outs, parts, strict=True):
            out[rows] = part
    return outs


def _slices(n: int, vocab: int, dtype: torch.dtype, sides: int):
    per_logit = sides * (4 + (0 if dtype == torch.float32 else torch.finfo(dtype).bits // 8))
    width = max(1, SLICE_BYTES // max(1, n * per_logit))
    width = vocab if width >= vocab else max(128, width // 128 * 128)
    return (slice(c0, min(vocab, c0 + width)) for c0 in range(0, vocab, width))


def backward(policy, refs, targets, head_p: HeadArgs, head_q: HeadArgs, div: Divergence,
             ignore_index: int, stats, g_div, g_logp, need_p, need_ref: bool,
             fp32_dh: bool = False):
    """The contract of divergence_passes.backward."""
    n, v = policy.hidden.shape[0], policy.weight.shape[0]
    dtype = policy.hidden.dtype
    grads_p = SideGrads(policy, need_p)
    grads_q = [SideGrads(side, (True, True, True)) for side in refs] if need_ref else []
    every = slice(None)
    for cols in _slices(n, v, dtype, 2):
        raw_p = mixed_logits([policy], every, cols, torch.float32)
        raw_q = mixed_logits(refs, every, cols, torch.float32)
        half = dtype != torch.float32
        out_p = torch.empty(raw_p.shape, dtype=dtype, device=raw_p.device) if half else raw_p
        out_q = None
        if need_ref:
            out_q = torch.empty(raw_q.shape, dtype=dtype, device=raw_q.device) if half else raw_q
        kernels.divergence_bwd(raw_p, raw_q, cols.start, targets, stats, g_div, g_logp,
                               (head_p.factor, head_p.softcap), (head_q.factor, head_q.softcap),
                               div.kind, div.beta, div.alpha, ignore_index, out_p, out_q)
        grads_p.add(cols, out_p)
        for g in grads_q:
            g.add(cols, out_q)
    return grads_p.result(fp32_dh) + [t for g in grads_q for t in g.result(fp32_dh)]
