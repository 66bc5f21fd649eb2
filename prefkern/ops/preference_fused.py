"""Pairwise preference losses with the gradient computed in the forward pass, a chunk of whole
pairs at a time.

TRL's concatenated batch (B chosen then B rejected sequences, padded (2B, T)): the loss of a
separable loss type is ``sum_i l(chosen_i, rejected_i) / B`` (reduction mean), so a pair's
token gradients are known as soon as its two sequences' log-probs are. Per chunk of pairs
(both sequences of each, every token row): one fp32-output GEMM gives the chunk's logits, its
per-token log-probs, the pair losses and by autograd on those few scalars d loss / d logp per
token, hence d loss / d logits, which go into dh (complete for the rows) and dW, db
(accumulated): 3 GEMMs in all (6NHV FLOPs) against 4 (8NHV) for a forward and a recomputing
backward. The chunk's logits live only inside the chunk: chunks hold as many pairs as fit
``budget_bytes`` of fp32 logits (32 MiB on CPU, 256 MiB on a GPU by default; the torch engine
holds about two such buffers, the Triton one the logits and their gradient), so memory does
not grow with the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prefkern.losses.preference import preference_loss
from prefkern.losses.sequence import ld_token_sums
from prefkern.ops import policy_fused
from prefkern.ops.divergence_passes import HeadArgs, Side

# loss types whose batch loss is a sum of per-pair terms (aot sorts the batch, sft and the RPO
# term divide by the batch's token count: those take the two-pass path)
SEPARABLE = frozenset({"sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
                       "sppo_hard", "apo_zero", "apo_down", "discopop", "sigmoid_norm"})


# the default logits budget per device type: a CPU's GEMMs reach their speed on smaller chunks
DEFAULT_BUDGET_BYTES = {"cpu": 32 << 20, "cuda": 256 << 20}


def pair_chunks(b: int, t: int, vocab: int, budget_bytes: int | None,
                device) -> list[Tensor] | None:
    """Row indices of chunks of whole pairs in the flattened (2B * T) rows; None when one pair
    alone exceeds the budget (None: DEFAULT_BUDGET_BYTES for the device)."""
    if budget_bytes is None:
        budget_bytes = DEFAULT_BUDGET_BYTES.get(torch.device(device).type,
                                                DEFAULT_BUDGET_BYTES["cuda"])
    per_pair = 2 * t * vocab * 4
    pairs = budget_bytes // per_pair
    if pairs < 1:
        return None
    offsets = torch.arange(t, device=device)
    chunks = []
    for p0 in range(0, b, pairs):
        ids = torch.arange(p0, min(b, p0 + pairs), device=device)
        seqs = torch.cat([ids, ids + b])  # the chunk's chosen, then its rejected
        chunks.append((seqs[:, None] * t + offsets).reshape(-1))
    return chunks


def fused_dpo(policy: Side, targets: Tensor, head: HeadArgs, ignore_index: int,
              ref_chosen: Tensor | None, ref_rejected: Tensor | None, chunks, triton: bool,
              need, ld_alpha: float | None, loss_kw: dict, shard=None):
    """-> (token log-probs (2B * T,), dh, dW, db) of ``preference_loss`` (reduction mean)
    on TRL's padded concatenated batch, ``chunks`` from :func:`pair_chunks`; ``shard``: a
    vocab-parallel head (prefkern.ops.policy_fused.fused_policy)."""
    b2, t = targets.shape
    b = b2 // 2
    flat = targets.reshape(-1)
    mask = flat != ignore_index

    def token_loss(rows, logp, _entropy):
        k = rows.numel() // (2 * t)  # pairs in the chunk
        pair_ids = rows.view(2 * k, t)[:k, 0] // t
        lp = logp.view(2 * k, t)
        m = mask[rows].view(2 * k, t)
        sums = ld_token_sums(lp, m, None, ld_alpha) if ld_alpha is not None else \
            torch.where(m, lp, 0).sum(-1)
        counts = m.sum(-1)
        refs = (None, None) if ref_chosen is None else \
            (ref_chosen[pair_ids], ref_rejected[pair_ids])
        loss, _ = preference_loss(sums[:k], sums[k:], *refs, chosen_lengths=counts[:k],
                                  rejected_lengths=counts[k:], reduction="sum", **loss_kw)
        return loss / b

    logp, _, dh, dw, db = policy_fused.fused_policy(policy, flat, head, ignore_index,
                                                    token_loss, triton, need,
                                                    row_chunks=chunks, shard=shard,
                                                    with_entropy=False)
    return logp, dh, dw, db
