"""K target ids per row: the log-probs of several given tokens from one softmax.

``logp[n, k] = z[n, y[n, k]] - lse[n]``, so a row's softmax statistics are computed once (by
any backend, through a representative target of the row) and the K picked logits come from a
gather: ``hidden[n] . weight[y[n, k]]`` for the linear op, ``logits[n, y[n, k]]`` otherwise.
Backward, with S = sum_k g[n, k] over valid entries:
    dz = sum_k g[n, k] onehot(y[n, k]) - S p - g_ent p (log p + entropy) + g_lse p
i.e. the backend's gradient for an lse gradient of ``g_lse - S`` plus a sparse term at the K
target columns, added here in fp32.
"""

from __future__ import annotations

import torch

from prefkern import _checks
from prefkern.ops.softmax_stats import LOG_FLOOR
from prefkern.ops.torch_chunked import CHUNK_ELEMENTS, head_transform_, rows_factor
from prefkern.reference.logprobs import compute_dtype


def representative(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """(N, K) -> (N,): each row's first valid id, ``ignore_index`` when all K are ignored (the
    backends then skip the row)."""
    valid = targets != ignore_index
    first = valid.to(torch.uint8).argmax(-1, keepdim=True)
    return torch.where(valid.any(-1), targets.gather(-1, first).squeeze(-1), ignore_index)


def safe_ids(targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (ids with ignored entries replaced by 0 (int64), valid mask)."""
    valid = targets != ignore_index
    return torch.where(valid, targets, 0).long(), valid


def picked_logprobs(picked, lse, valid):
    """(N, K) log-probs ``picked - lse`` (0 where not valid), at most 0: the K logits are
    recomputed outside the pass that fixed the row's max and lse, so a different summation
    order can put a dominant one a few ulps above lse; its true log-prob is <= 0. (The
    backward forms its gradient separately, exactly.)"""
    return torch.where(valid, (picked - lse.unsqueeze(-1)).clamp(max=0), 0).to(lse.dtype)


def lse_gradient(g_lse, g_logp, valid):
    """The lse gradient the backend sees: g_lse - sum_k g_logp[:, k] over valid entries."""
    total = torch.where(valid, g_logp, 0).sum(-1)
    return -total if g_lse is None else g_lse - total


def _row_steps(n: int, width: int, device: torch.device):
    budget = CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cuda"])
    step = max(1, budget // max(width, 1))
    return (slice(r0, min(n, r0 + step)) for r0 in range(0, n, step))


# ------------------------------------------------------------------------------ linear head

def _picked_raw(hidden, weight, bias, ids, rows):
    """(n, K) raw logits hidden[rows] . weight[ids[rows]] + bias, in the compute dtype (fp32
    products and sums for half inputs: the numerics contract)."""
    cdt = compute_dtype(hidden.dtype)
    w = weight[ids[rows]].to(cdt)  # (n, K, H)
    raw = torch.bmm(w, hidden[rows].to(cdt).unsqueeze(-1)).squeeze(-1)
    if bias is not None:
        raw += bias[ids[rows]].to(cdt)
    return raw, w


def linear_picked_logits(hidden, weight, bias, ids, inv_temp, softcap):
    """-> z[n, ids[n, k]] (N, K) in the compute dtype, for the head z = softcap(raw) * inv_temp."""
    n, k = ids.shape
    out = torch.empty((n, k), dtype=compute_dtype(hidden.dtype), device=hidden.device)
    for rows in _row_steps(n, k * hidden.shape[1], hidden.device):
        raw, _ = _picked_raw(hidden, weight, bias, ids, rows)
        out[rows] = head_transform_(raw, rows_factor(inv_temp, rows), softcap)[0]
    return out


def _accumulate_rows_(acc, index, values, deterministic: bool):
    """acc[index[i]] += values[i]; with ``deterministic``, in an order that does not change
    from run to run (index_put_ with accumulate under torch's deterministic mode sorts the
    indices on CUDA instead of using atomics)."""
    if not deterministic or acc.device.type == "cpu":
        acc.index_put_((index,), values, accumulate=True)
        return
    previous = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        acc.index_put_((index,), values, accumulate=True)
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=warn_only)


def linear_picked_grads_(dh, dw, db, hidden, weight, bias, ids, valid, g, inv_temp, softcap,
                         deterministic: bool = False):
    """Add the sparse term sum_k g[n, k] dz[n, ids[n, k]] / d(inputs) into dh (N, H), dw (V, H)
    and db (V,) (each may be None), accumulated in fp32 and added to each output (for half
    inputs: one more rounding of dw and db than the backend's own)."""
    n, k = ids.shape
    h_dim = hidden.shape[1]
    cdt = compute_dtype(hidden.dtype)
    coeff = torch.empty((n, k), dtype=cdt, device=hidden.device)  # d loss / d raw, sparse
    for rows in _row_steps(n, k * h_dim, hidden.device):
        raw, w = _picked_raw(hidden, weight, bias, ids, rows)
        factor = rows_factor(inv_temp, rows)
        _, dcap = head_transform_(raw, factor, softcap, with_grad=True)
        c = torch.where(valid[rows], g[rows].to(cdt), 0) * factor
        if dcap is not None:
            c = c * dcap
        coeff[rows] = c
        if dh is not None:
            part = torch.bmm(c.unsqueeze(1), w).squeeze(1)
            dh[rows] = (dh[rows].to(cdt) + part).to(dh.dtype)
    flat_ids = ids.reshape(-1)
    if db is not None:
        db32 = db.to(cdt)
        _accumulate_rows_(db32, flat_ids, coeff.reshape(-1), deterministic)
        db.copy_(db32)
    if dw is None:
        return
    budget = CHUNK_ELEMENTS.get(hidden.device.type, CHUNK_ELEMENTS["cuda"])
    cols = max(1, budget // max(h_dim, 1))
    for v0 in range(0, weight.shape[0], cols):  # bounded fp32 accumulator per vocab range
        v1 = min(weight.shape[0], v0 + cols)
        acc = dw[v0:v1].to(cdt)
        inside = (ids >= v0) & (ids < v1)
        local = torch.where(inside, ids - v0, 0)
        for rows in _row_steps(n, k * h_dim, hidden.device):
            c = torch.where(inside[rows], coeff[rows], 0)
            contrib = c.unsqueeze(-1) * hidden[rows].to(cdt).unsqueeze(1)  # (n, K, H)
            _accumulate_rows_(acc, local[rows].reshape(-1), contrib.reshape(-1, h_dim),
                              deterministic)
        dw[v0:v1] = acc


# ------------------------------------------------------------------------ materialized logits

def logits_picked(logits, ids, inv_temp):
    """logits (..., V) with N rows, ids (N, K) -> z[n, ids[n, k]] (N, K) in the compute dtype:
    the logits gathered in place (no copy of a strided view), then scaled."""
    k = ids.shape[-1]
    z = logits.gather(-1, ids.view(*logits.shape[:-1], k)).reshape(-1, k)
    z = z.to(compute_dtype(logits.dtype))
    return z * (inv_temp[:, None] if isinstance(inv_temp, torch.Tensor) else inv_temp)


def logits_picked_grad_(grad, logits, ids, valid, lse, entropy, g_logp, g_ent, inv_temp,
                        picked=None, g_lse=None, g_extra=None):
    """Overwrite the K target columns of ``grad`` (..., V) (N rows), which holds the backend's
    gradient for the lse gradient g_lse - S, with their exact value computed in fp32 (one
    rounding, as at every other column): dz = G - p (S - g_lse + g_ent (log p + entropy))
    + g_sq p^2 + g_const, times inv_temp, where G sums g_logp over the row's entries with that
    id and g_extra = (g_sq, g_const) (N, 2) comes from the extra statistics. ``picked``: z at
    the K targets, read before ``grad`` overwrote the logits (in-place backward)."""
    cdt = compute_dtype(logits.dtype)
    g = torch.where(valid, g_logp.to(cdt), 0)
    n, k = ids.shape
    big_g = torch.empty_like(g)
    for rows in _row_steps(n, k * k, ids.device):  # (n, K, K) id matches, bounded
        same = (ids[rows].unsqueeze(-1) == ids[rows].unsqueeze(-2)) & valid[rows].unsqueeze(-2)
        big_g[rows] = (same.to(cdt) @ g[rows].unsqueeze(-1)).squeeze(-1)
    total = g.sum(-1, keepdim=True)
    if picked is None:  # (the caller passes them when grad overwrote the logits)
        picked = logits_picked(logits, ids, inv_temp)
    log_p = (picked - lse.unsqueeze(-1)).clamp(min=LOG_FLOOR)
    p = log_p.exp()
    coeff = total if g_lse is None else total - g_lse.unsqueeze(-1)
    if g_ent is not None:
        coeff = coeff + g_ent.unsqueeze(-1) * (log_p + entropy.unsqueeze(-1))
    value = big_g - p * coeff
    if g_extra is not None:
        value = value + g_extra[:, :1] * p * p + g_extra[:, 1:]
    value = value * (inv_temp[:, None] if isinstance(inv_temp, torch.Tensor) else inv_temp)
    # ignored entries rewrite the row's first valid column with its own value; rows with no
    # valid entry (zeroed by the backend) rewrite column 0 with 0
    first = valid.to(torch.uint8).argmax(-1, keepdim=True)
    cols = torch.where(valid, ids, ids.gather(-1, first))
    value = torch.where(valid, value, value.gather(-1, first))
    value = torch.where(valid.any(-1, keepdim=True), value, 0)
    lead = (*grad.shape[:-1], cols.shape[-1])  # grad (..., V) may be a strided view
    grad.scatter_(-1, cols.view(lead), value.to(grad.dtype).view(lead))


# ------------------------------------------------------------------------------ public forms

def prepare(targets, lead: torch.Size, vocab: int, ignore_index: int, op: str,
            device: torch.device):
    """Targets as a public op takes them -> (flat targets for the custom ops, logp shape or
    None, bad entries or None, bad rows or None, the ignore_index to pass them with).

    ``targets`` (...) gives (N,) flat ids; (..., K) gives (N, K) (K = 1 is flattened to (N,):
    the same computation as the (...) form, bit for bit); None (no log-prob wanted) gives zeros
    with ignore_index -1, so that every row counts whatever the caller's ignore_index. Ids are
    screened as :func:`prefkern._checks.screen_targets` does.
    """
    n = lead.numel()
    if targets is None:
        return torch.zeros(n, dtype=torch.int64, device=device), None, None, None, -1
    _checks.check_index("targets", targets)
    if targets.shape == lead:
        flat = targets.reshape(n)
    elif targets.dim() == len(lead) + 1 and targets.shape[:-1] == lead:
        if targets.shape[-1] == 0:
            raise ValueError("targets of shape (..., K) need K >= 1")
        k = targets.shape[-1]
        flat = targets.reshape(n) if k == 1 else targets.reshape(n, k)
    else:
        raise ValueError(f"targets must have shape {tuple(lead)} or {tuple(lead)} + (K,), got "
                         f"{tuple(targets.shape)}")
    if targets.device != device:
        raise ValueError(f"targets are on {targets.device}, the inputs on {device}")
    flat, bad = _checks.screen_targets(flat, vocab, ignore_index, op)
    bad_rows = None if bad is None else (bad.any(-1) if bad.dim() == 2 else bad)
    return flat, targets.shape, bad, bad_rows, ignore_index
