"""Per-token policy-gradient losses with the gradient computed in the forward pass.

Every aggregation of prefkern.losses.policy_loss is linear in the per-token losses
(``loss = sum_t w_t L_t(logp_t, H_t)``, :func:`prefkern.losses.policy.aggregation_weights`), so
d loss / d logp_t and d loss / d H_t are known as soon as token t's log-prob and entropy are.
Per chunk of rows: one fp32-output GEMM gives the logits chunk, its row statistics (log-prob,
entropy, lse), the two per-token gradients (autograd on the elementwise loss of the chunk), and
at once d loss / d logits, which goes into dh (1 GEMM, complete for the rows) and dW, db (1
GEMM accumulated over chunks in fp32). 3 GEMMs in all (6NHV FLOPs) against 4 for a forward and
a recomputing backward. GSPO's sequence-level ratio couples a sequence's tokens: it takes the
two-pass path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prefkern.ops import softmax_stats
from prefkern.ops.divergence_passes import HeadArgs, Side, mixed_logits
from prefkern.ops.linear_sliced import SLICE_BYTES
from prefkern.ops.row_chunk_grads import RowChunkGrads
from prefkern.ops.torch_chunked import (
    _is_unit,
    grad_logits,
    head_transform_,
    rows_factor,
)
from prefkern.ops.vocab_parallel import (
    VocabShard,
    local_ignore,
    local_targets,
    merge_chunk_stats,
    sum_over_shards,
)
from prefkern.reference.logprobs import compute_dtype

# the dW accumulation costs a pass over (V, H) per chunk: chunks of rows larger than the torch
# backend's keep it small against the chunk's GEMMs
FUSED_CHUNK_ELEMENTS = {"cpu": 1 << 23, "cuda": 1 << 26}


def _row_chunks(n: int, v: int, device: torch.device, triton: bool):
    """v: the full vocabulary (vocab-parallel ranks must agree on the chunks)."""
    step = max(1, SLICE_BYTES // (6 * v)) if triton else \
        max(1, FUSED_CHUNK_ELEMENTS.get(device.type, FUSED_CHUNK_ELEMENTS["cuda"]) // (3 * v))
    return [slice(r0, min(n, r0 + step)) for r0 in range(0, n, step)]


def _stats_torch(raw, head, rows, targets, with_entropy: bool = True):
    """-> unfinished (m, s, u or None, z[y] or 0 where y is not a column) and the gradient
    state."""
    factor = rows_factor(head.factor, rows)
    z, dcap = head_transform_(raw, factor, head.softcap, with_grad=True)
    m, s, u = softmax_stats.row_stats(z, with_entropy)
    hit, picked = softmax_stats.pick_target(z, targets)
    return (m, s, u, torch.where(hit, picked, 0)), (z, dcap, factor)


def _grad_torch(state, targets, valid, stats, g_logp, g_ent):
    z, dcap, factor = state
    _, entropy, lse = stats
    lse = torch.where(valid, lse, float("inf"))  # ignored rows: p = 0
    dz = grad_logits(z, targets.long(), lse, entropy, g_logp, g_ent, None)
    if dcap is not None:
        dz.mul_(dcap)
    if not _is_unit(factor):
        dz.mul_(factor)
    return dz.masked_fill_(~valid[:, None], 0)


def _stats_triton(raw, head, rows, targets, ignore_index):
    from prefkern._kernels import logits_slice

    factor = head.factor[rows] if isinstance(head.factor, Tensor) else head.factor
    stats = logits_slice.new_stats(raw.shape[0], raw.device)
    logits_slice.slice_stats_(raw, targets, 0, stats, factor, head.softcap, ignore_index)
    return stats, factor


def _grad_triton(raw, dz, targets, stats, g_logp, g_ent, factor, head, ignore_index):
    from prefkern._kernels import logits_slice

    _, entropy, lse = stats
    logits_slice.slice_grad_(raw, dz, targets, 0, lse, entropy, g_logp, g_ent, None, factor,
                             head.softcap, ignore_index)
    return dz


def fused_policy(policy: Side, targets: Tensor, head: HeadArgs, ignore_index: int,
                 token_loss, triton: bool, need: tuple[bool, bool, bool], row_chunks=None,
                 shard: VocabShard | None = None, with_entropy: bool = True):
    """policy: (hidden (N, H), weight, bias); targets (N,);
    ``token_loss(rows, logp, entropy) -> scalar``: the chunk's share of the loss, a
    differentiable function of its (r,) log-probs and entropies. ``row_chunks``: the chunks
    (slices or index tensors, together every row once) when the loss couples rows (whole
    sequences or pairs); default: contiguous rows sized for the logits budget.
    ``shard``: policy.weight (and bias) are this rank's rows of a vocab-parallel head
    (prefkern.ops.vocab_parallel): every chunk's row statistics are merged across the group
    (one all-gather), d logits is local, dW and db stay local and dh is summed over the group.
    ``with_entropy=False``: a loss of the log-probs only (token_loss gets zeros for the
    entropies; the torch engine then keeps one (r, V) buffer fewer).
    -> (logp (N,), entropy (N,), dh, dW, db) with the gradients of the whole loss (None where
    not needed)."""
    hidden, weight, bias = policy.hidden, policy.weight, policy.bias
    n, v = hidden.shape[0], weight.shape[0]
    cdt = torch.float32 if triton else compute_dtype(hidden.dtype)
    valid = targets != ignore_index
    if shard is not None:
        v = shard.vocab
        targets = local_targets(targets, shard.start, weight.shape[0], ignore_index)
        ignore_index = local_ignore(ignore_index)  # the kernels see local targets
    logp_out = torch.zeros(n, dtype=cdt, device=hidden.device)
    entropy_out = torch.zeros_like(logp_out)
    grads = RowChunkGrads(hidden, weight, bias, need, fp32_dh=shard is not None)
    every = slice(None)
    for rows in row_chunks if row_chunks is not None else _row_chunks(n, v, hidden.device,
                                                                       triton):
        raw = mixed_logits([policy], rows, every, cdt)
        y, ok = targets[rows], valid[rows]
        if triton:
            raw_stats, factor = _stats_triton(raw, head, rows, y, ignore_index)
        else:
            raw_stats, state = _stats_torch(raw, head, rows, y, with_entropy)
        stats = softmax_stats.finish(*merge_chunk_stats(*raw_stats, shard), ok)
        if stats[1] is None:
            stats = (stats[0], torch.zeros_like(stats[0]), stats[2])
        logp, entropy = stats[0], stats[1]
        with torch.enable_grad():
            lp = logp.detach().requires_grad_(True)
            ent = entropy.detach().requires_grad_(with_entropy)
            inputs = (lp, ent) if with_entropy else (lp,)
            upstream = torch.autograd.grad(token_loss(rows, lp, ent), inputs,
                                           allow_unused=True, materialize_grads=True)
        g_logp, g_ent = (None if g is None else torch.where(ok, g, 0).to(cdt).contiguous()
                         for g in (*upstream, None)[:2])
        if triton:
            half = hidden.dtype != torch.float32
            dz = torch.empty(raw.shape, dtype=hidden.dtype, device=raw.device) if half else raw
            dz = _grad_triton(raw, dz, y, stats, g_logp, g_ent, factor, head, ignore_index)
        else:
            dz = _grad_torch(state, y, ok, stats, g_logp, g_ent)
        logp_out[rows], entropy_out[rows] = logp, entropy
        grads.add(rows, dz)
    dh, dw, db = grads.result()
    if shard is not None and dh is not None:  # the hidden states are every rank's
        dh = sum_over_shards(dh, shard).to(hidden.dtype)
    return logp_out, entropy_out, dh, dw, db
