"""The distillation loss with the student's gradient computed in the forward pass.

When the loss is ``w_soft * sum_t D_t / norm + w_hard * sum_t -logp_t / norm`` (a reduction
known at forward time), d loss / d logits of every token is known as soon as its row of logits
is: per chunk of rows, the two logit chunks (2 GEMMs, fp32 output) give the row statistics and
at once the d-logits, which go straight into dh (1 GEMM, complete for the rows) and dW, db
(1 GEMM accumulated over the chunks in fp32). 4 GEMMs in all (8NHV FLOPs) against 6 for a
forward and a recomputing backward; the backward only scales the stored gradients by the
incoming scalar. Memory: the chunks, dh, and an fp32 (V, H) accumulator for dW when the
weight is half precision (the contract: gradients accumulated in fp32).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from prefkern.ops.divergence_passes import (
    HeadArgs,
    Side,
    forward_rows,
    grads_of_logits,
    mixed_logits,
)
from prefkern.ops.linear_sliced import SLICE_BYTES
from prefkern.ops.row_chunk_grads import RowChunkGrads
from prefkern.ops.torch_chunked import CHUNK_ELEMENTS, _is_unit, head_transform_, rows_factor
from prefkern.ops.vocab_parallel import (
    VocabShard,
    local_ignore,
    local_targets,
    sum_over_shards,
)
from prefkern.reference.divergence import Divergence
from prefkern.reference.logprobs import compute_dtype


def _row_chunks(n: int, v: int, device: torch.device, triton: bool):
    step = max(1, SLICE_BYTES // (8 * v)) if triton else \
        max(1, CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cuda"]) // (4 * v))
    return [slice(r0, min(n, r0 + step)) for r0 in range(0, n, step)]


def _chunk_torch(raw_p, raw_q, head_p, head_q, rows, targets, gd, gl, div, ignore_index):
    """Torch engine on one chunk: -> (D, logp at T, d loss / d raw_p) (r,) (r,) (r, V)."""
    factor = rows_factor(head_p.factor, rows)
    z_p, dcap = head_transform_(raw_p.clone(), factor, head_p.softcap, with_grad=True)
    z_q, _ = head_transform_(raw_q, rows_factor(head_q.factor, rows), head_q.softcap)
    every = slice(None)
    out = forward_rows(z_p.shape[0], [every], lambda _: (z_p.clone(), z_q.clone()), targets,
                       div, ignore_index, False, z_p.dtype, z_p.device)
    dz, _ = grads_of_logits(z_p, z_q, 0, out[2:], every, targets, targets != ignore_index, gd,
                            gl, div, False)
    if dcap is not None:
        dz.mul_(dcap)
    if not _is_unit(factor):
        dz.mul_(factor)
    # ignored rows carry no statistics (their z is unnormalized): zero them before the GEMMs
    return out[0], out[1], dz.masked_fill_(~(targets != ignore_index)[:, None], 0)


def _chunk_sharded(raw_p, raw_q, head_p, head_q, rows, targets, gd, gl, div, ignore_index,
                   shard):
    """Vocab-parallel chunk (prefkern.ops.vocab_parallel_divergence's row math, torch ops on
    every backend): targets local to the shard -> (D, logp at T, d loss / d raw_p shard)."""
    from prefkern.ops.vocab_parallel_divergence import chunk_statistics

    factor = rows_factor(head_p.factor, rows)
    z_p, dcap = head_transform_(raw_p.clone(), factor, head_p.softcap, with_grad=True)
    z_q, _ = head_transform_(raw_q, rows_factor(head_q.factor, rows), head_q.softcap)
    valid = targets != ignore_index
    out = chunk_statistics(z_p.clone(), z_q.clone(), targets, valid, div, False, shard.group)
    every = slice(None)
    dz, _ = grads_of_logits(z_p, z_q, 0, out[2:], every, targets, valid, gd, gl, div, False)
    if dcap is not None:
        dz.mul_(dcap)
    if not _is_unit(factor):
        dz.mul_(factor)
    return out[0], out[1], dz.masked_fill_(~valid[:, None], 0)


def _chunk_triton(raw_p, raw_q, head_p, head_q, rows, targets, gd, gl, div, ignore_index):
    from prefkern._kernels import divergence as kernels

    def rows_head(head):
        factor = head.factor[rows] if isinstance(head.factor, Tensor) else head.factor
        return factor, head.softcap

    out = kernels.divergence_fwd(raw_p, raw_q, targets, rows_head(head_p), rows_head(head_q),
                                 div.kind, div.beta, div.alpha, ignore_index, False)
    dz = torch.empty_like(raw_p)
    kernels.divergence_bwd(raw_p, raw_q, 0, targets, out[2:], gd, gl, rows_head(head_p),
                           rows_head(head_q), div.kind, div.beta, div.alpha, ignore_index, dz)
    return out[0], out[1], dz


def _hard_term_(dz, raw_p, head_hard: HeadArgs, rows, targets, valid, g_logp, shard=None):
    """Adds the gradient of sum g_logp * logp_1 (logp_1: the untempered student's) to dz;
    -> logp_1 (r,). With a vocab ``shard``: targets local to it, the softmax over the group."""
    factor = rows_factor(head_hard.factor, rows)
    z, dcap = head_transform_(raw_p, factor, head_hard.softcap, with_grad=True)
    if shard is None:
        log_p = z.log_softmax(-1)
    else:
        from prefkern.ops.vocab_parallel_divergence import global_log_softmax

        log_p = global_log_softmax(z, shard.group)[0]
    owned = valid & (targets >= 0) & (targets < z.shape[1])
    y = torch.where(owned, targets, 0).long()[:, None]
    logp = torch.where(owned, log_p.gather(1, y)[:, 0], 0)
    d = log_p.exp_().mul_(-g_logp[:, None]).scatter_add_(1, y,
                                                          torch.where(owned, g_logp, 0)[:, None])
    if dcap is not None:
        d.mul_(dcap)
    if not _is_unit(factor):
        d.mul_(factor)
    dz.add_(d.masked_fill_(~valid[:, None], 0))
    return torch.where(valid, sum_over_shards(logp, shard), 0)


def fused_distill(policy: Side, refs: list[Side], targets: Tensor, head_p: HeadArgs,
                  head_q: HeadArgs, head_hard: HeadArgs | None, div: Divergence,
                  ignore_index: int, soft_scale: Tensor, hard_scale: Tensor, triton: bool,
                  need: tuple[bool, bool, bool], shard: VocabShard | None = None):
    """-> (D (N,), logp (N,), dh, dW, db) where logp is the hard term's (at temperature 1 when
    head_hard is given, else at T) and the grads are those of
    ``soft_scale * sum(D) - hard_scale * sum(logp)`` over valid tokens (None if not needed).
    soft_scale, hard_scale: 0-d fp32 tensors (no host read). ``shard``: the weights are this
    rank's rows of vocab-parallel heads (both sides sharded alike): each chunk's row
    statistics are merged over the group, dW and db stay local, dh is summed."""
    hidden, weight, bias = policy.hidden, policy.weight, policy.bias
    n, v = hidden.shape[0], weight.shape[0]
    cdt = torch.float32 if triton else compute_dtype(hidden.dtype)
    valid = targets != ignore_index
    chunk = _chunk_triton if triton else _chunk_torch
    if shard is not None:
        v = shard.vocab  # the same chunks on every rank
        targets = local_targets(targets, shard.start, weight.shape[0], ignore_index)
        ignore_index = local_ignore(ignore_index)  # the chunks see local targets
        chunk = functools.partial(_chunk_sharded, shard=shard)
    zero = torch.zeros((), dtype=cdt, device=hidden.device)
    gd = torch.where(valid, soft_scale.to(cdt), zero)
    g_hard = torch.where(valid, hard_scale.to(cdt), zero)
    gl = None if head_hard is not None else -g_hard
    d_out = torch.zeros(n, dtype=cdt, device=hidden.device)
    logp_out = torch.zeros_like(d_out)
    grads = RowChunkGrads(hidden, weight, bias, need, fp32_dh=shard is not None)
    every = slice(None)
    for rows in _row_chunks(n, v, hidden.device, triton):
        raw_p = mixed_logits([policy], rows, every, cdt)
        raw_q = mixed_logits(refs, rows, every, cdt)
        d, logp, dz = chunk(raw_p, raw_q, head_p, head_q, rows, targets[rows], gd[rows],
                            None if gl is None else gl[rows], div, ignore_index)
        if head_hard is not None:
            logp = _hard_term_(dz, raw_p, head_hard, rows, targets[rows], valid[rows],
                               -g_hard[rows], shard)
        d_out[rows], logp_out[rows] = d, logp
        grads.add(rows, dz)
    dh, dw, db = grads.result()
    if shard is not None and dh is not None:  # the hidden states are every rank's
        dh = sum_over_shards(dh, shard).to(hidden.dtype)
    return d_out, logp_out, dh, dw, db
