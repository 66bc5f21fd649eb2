"""Per-token log-probs, entropy and logsumexp straight from hidden states and the LM-head weight.

Replaces ``logits = hidden @ weight.T + bias; logp = (logits.float() / T).log_softmax(-1)
.gather(-1, targets[..., None])[..., 0]`` (see :func:`prefkern.reference.linear_logprobs_ref`)
without ever writing the (N, V) logits: memory is O(N*H + one chunk).

Modes (Triton backend):
  fast        cuBLAS GEMMs on vocab slices + Triton row kernels; a bounded logits-slice buffer,
              fp32 dhidden accumulation, one exact GEMM per vocab slice for dweight.
              FLOPs: fwd 2NHV; bwd 6NHV (recompute + dh + dW).
  min_memory  fused Triton kernels: logit tiles never leave on-chip memory; gradients accumulate
              in a bounded fp32 scratch. FLOPs: fwd 2NHV; bwd 8NHV (dh and dW passes each
              recompute their tiles).
Numerics contract (every mode and backend): logits are accumulated in fp32 and never rounded
to the input dtype before the softmax, so every path computes the same function and a ratio
exp(logp - old_logp) does not depend on which path computed each side. Only the d-logits fed to
the gradient GEMMs are rounded to the input dtype. No softmax entry is skipped. The torch
backend is chunked the same way.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from prefkern import _checks
from prefkern._autocast import without_autocast
from prefkern.dispatch import resolve_backend
from prefkern.ops import head as head_mod
from prefkern.ops import multi_target, softmax_stats, torch_chunked, vocab_parallel
from prefkern.outputs import HeadOutput, LinearLogprobsOutput
from prefkern.reference.logprobs import compute_dtype

AUTO_ORDER = ("triton",)
MODES = ("auto", "fast", "min_memory")


def _fused_raw(hidden, weight, bias, targets, inv_temp, softcap, ignore_index,
               with_entropy: bool = True, with_stats: bool = False):
    """min_memory: the kernel's per-split statistics, merged."""
    from prefkern._kernels import linear_logprobs_fused as fused

    parts = fused.linear_logprobs_fwd(hidden, weight, bias, targets, inv_temp, softcap,
                                      ignore_index, extra=with_stats)
    m_splits, s, u, z_target = parts[:4]
    m, s, u = softmax_stats.merge_along(m_splits, s, u)
    extra = softmax_stats.merge_extra_along(m_splits, *parts[4:]) if with_stats else None
    return softmax_stats.RawStats(m, s, u, z_target.sum(0), extra)


def raw_forward(backend: str, mode: str):
    """The unfinished-statistics forward of one backend/mode (what vocab parallelism merges
    across ranks)."""
    if backend == "torch":
        return torch_chunked.linear_raw
    if mode == "min_memory":
        return _fused_raw
    from prefkern.ops import linear_sliced

    return linear_sliced.raw


def _finished(raw_fn):
    def forward(hidden, weight, bias, targets, inv_temp, softcap, ignore_index,
                with_entropy: bool = True, with_stats: bool = False):
        raw = raw_fn(hidden, weight, bias, targets, inv_temp, softcap, ignore_index,
                     with_entropy, with_stats)
        return softmax_stats.finish_raw(raw, targets != ignore_index, weight.shape[0])

    return forward


def _impl(backend: str, mode: str, deterministic: bool):
    """-> (fwd, bwd) callables of one backend/mode (same signatures as torch_chunked's; the
    kernels' forwards compute the entropy whether asked or not, it costs them nothing)."""
    forward = _finished(raw_forward(backend, mode))
    if backend == "torch":
        return forward, torch_chunked.linear_backward
    if mode == "min_memory":
        from prefkern._kernels import linear_logprobs_fused as fused

        return forward, functools.partial(fused.linear_logprobs_bwd,
                                          deterministic=deterministic)
    from prefkern.ops import linear_sliced

    return forward, linear_sliced.backward


STATS_COLUMNS = 4  # sum_p2, mean_logit, max_logit, first argmax column (finish_extra)


# The passes are torch.library custom ops so that torch.compile(fullgraph=True) sees opaque,
# fake-able calls (no graph breaks on the kernel launches or the chunk loops).
@torch.library.custom_op("prefkern::linear_logprobs_fwd", mutates_args=())
def _fwd_op(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
            row_inv_temp: Tensor | None, backend: str, mode: str, deterministic: bool,
            inv_temp: float, softcap: float | None, ignore_index: int,
            with_entropy: bool, with_stats: bool) -> tuple[Tensor, Tensor, Tensor, Tensor,
                                                           Tensor]:
    """-> (logp shaped like targets, (N,) or (N, K); entropy (N,); lse (N,); stats (N, 4) or
    (0, 4) without with_stats; target-is-argmax bool shaped like targets, or (0,)). Entropy is
    zeros unless with_entropy. ``deterministic`` only matters to the backward."""
    fwd, _ = _impl(backend, mode, False)
    factor = inv_temp if row_inv_temp is None else row_inv_temp
    multi = targets.dim() == 2
    row_targets = multi_target.representative(targets, ignore_index) if multi else targets
    with without_autocast(hidden):
        logp, entropy, lse, stats = fwd(hidden, weight, bias, row_targets, factor, softcap,
                                        ignore_index, with_entropy=with_entropy,
                                        with_stats=with_stats)
        hit = hidden.new_empty(0, dtype=torch.bool)
        if multi:
            ids, valid = multi_target.safe_ids(targets, ignore_index)
            picked = multi_target.linear_picked_logits(hidden, weight, bias, ids, factor,
                                                       softcap)
            logp = multi_target.picked_logprobs(picked, lse, valid)
        if with_stats:
            hit = softmax_stats.target_hits(stats, targets, ignore_index)
    if not with_entropy or entropy is None:
        entropy = torch.zeros_like(lse)
    if stats is None:
        stats = lse.new_empty((0, STATS_COLUMNS))
    return logp, entropy, lse, stats.to(lse.dtype), hit


@_fwd_op.register_fake
def _(hidden, weight, bias, targets, row_inv_temp, backend, mode, deterministic, inv_temp,
      softcap, ignore_index, with_entropy, with_stats):
    dtype = compute_dtype(hidden.dtype)
    n = hidden.shape[0]
    return (hidden.new_empty(targets.shape, dtype=dtype),
            *(hidden.new_empty(n, dtype=dtype) for _ in range(2)),
            hidden.new_empty((n if with_stats else 0, STATS_COLUMNS), dtype=dtype),
            hidden.new_empty(targets.shape if with_stats else (0,), dtype=torch.bool))


@torch.library.custom_op("prefkern::linear_logprobs_bwd", mutates_args=())
def _bwd_op(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
            row_inv_temp: Tensor | None, lse: Tensor, entropy: Tensor, g_logp: Tensor | None,
            g_ent: Tensor | None, g_lse: Tensor | None, g_extra: Tensor | None, backend: str,
            mode: str, deterministic: bool, inv_temp: float, softcap: float | None,
            ignore_index: int, need_dh: bool, need_dw: bool, need_db: bool) -> list[Tensor]:
    """-> [dhidden if need_dh, dweight if need_dw, dbias if need_db]."""
    _, bwd = _impl(backend, mode, deterministic)
    factor = inv_temp if row_inv_temp is None else row_inv_temp
    multi = targets.dim() == 2
    row_targets = targets
    if multi:
        row_targets = multi_target.representative(targets, ignore_index)
        ids, valid = multi_target.safe_ids(targets, ignore_index)
        if g_logp is not None:  # the softmax part of d logp_k goes through the lse gradient
            g_lse = multi_target.lse_gradient(g_lse, g_logp, valid)
    with without_autocast(hidden):
        grads = bwd(hidden, weight, bias, row_targets, lse, entropy,
                    None if multi else g_logp, g_ent, g_lse, factor, softcap, ignore_index,
                    need_dh=need_dh, need_dw=need_dw, need_db=need_db, g_extra=g_extra)
        if multi and g_logp is not None:
            multi_target.linear_picked_grads_(*grads, hidden, weight, bias, ids, valid, g_logp,
                                              factor, softcap, deterministic)
    return [g for g, needed in zip(grads, (need_dh, need_dw, need_db), strict=True) if needed]


@_bwd_op.register_fake
def _(hidden, weight, bias, targets, row_inv_temp, lse, entropy, g_logp, g_ent, g_lse, g_extra,
      backend, mode, deterministic, inv_temp, softcap, ignore_index, need_dh, need_dw, need_db):
    return [torch.empty_like(t) for t, needed in zip((hidden, weight, bias),
                                                     (need_dh, need_dw, need_db), strict=True)
            if needed]


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, row_inv_temp, *options = inputs
    *ctx.options, ctx.with_entropy, ctx.with_stats = options  # backend, mode, deterministic,
    # inv_temp, softcap, ignore_index
    ctx.save_for_backward(hidden, weight, bias, targets, row_inv_temp, output[2], output[1],
                          output[3])


def _backward(ctx, g_logp, g_ent, g_lse, g_stats, _g_hit):
    hidden, weight, bias, targets, row_inv_temp, lse, entropy, stats = ctx.saved_tensors
    backend, mode, deterministic, inv_temp, softcap, ignore_index = ctx.options
    need = list(ctx.needs_input_grad[:3])
    need[2] = need[2] and bias is not None
    no_grads = (None,) * 10  # targets, row_inv_temp and the options
    if not ctx.with_entropy:
        g_ent = None  # the caller never saw the entropy: any gradient for it is zeros
    if not ctx.with_stats:
        g_stats = None
    if not any(need) or all(g is None for g in (g_logp, g_ent, g_lse, g_stats)):
        return (None, None, None, *no_grads)
    head_mod.check_not_released(weight)  # gathered for the forward only (ZeRO-3)
    g_logp, g_ent, g_lse, g_stats = (None if g is None else g.to(lse.dtype).contiguous()
                                     for g in (g_logp, g_ent, g_lse, g_stats))
    g_extra = None
    if g_stats is not None:
        g_lse, g_extra = softmax_stats.extra_gradients(stats, g_stats, g_lse, weight.shape[0])
    grads = iter(_bwd_op(hidden, weight, bias, targets, row_inv_temp, lse, entropy, g_logp,
                         g_ent, g_lse, g_extra, backend, mode, deterministic, inv_temp, softcap,
                         ignore_index, *need))
    dh, dw, db = (next(grads) if needed else None for needed in need)
    return (dh, dw, db, *no_grads)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _contiguous(t: Tensor) -> Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _skips(skip_ignored: bool | None, device: torch.device) -> bool:
    """Whether to gather the valid rows: needs their count on the host, so never while
    tracing or capturing (the shapes would be baked in), and by default only on CPU where the
    read costs no sync."""
    if torch.compiler.is_compiling():
        return False
    if device.type == "cuda" and torch.cuda.is_available() and \
            torch.cuda.is_current_stream_capturing():
        return False
    return device.type == "cpu" if skip_ignored is None else bool(skip_ignored)


def _valid_rows(flat: Tensor, ignore_index: int) -> Tensor:
    """Indices of the rows with at least one valid target (reads the count on the host)."""
    valid = flat != ignore_index
    if valid.dim() == 2:
        valid = valid.any(-1)
    return valid.nonzero().squeeze(1)


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor | None,
                    bias: torch.Tensor | None = None, *, temperature: float | Tensor = 1.0,
                    logit_scale: float | None = None, ignore_index: int = -100,
                    softcap: float | None = None, return_entropy: bool = False,
                    return_lse: bool = False, return_stats: bool = False, mode: str = "auto",
                    deterministic: bool = False, skip_ignored: bool | None = None,
                    process_group=None, vocab_start: int | None = None,
                    vocab_size: int | None = None, backend: str | None = None):
    """Per-token log-prob of ``targets`` under ``softmax(softcap(s * (h @ W.T + b)) / T)``.

    ``z = softcap * tanh(logit_scale * (hidden @ weight.T + bias).float() / softcap) / T;
    logp = z.log_softmax(-1).gather(-1, targets[..., None])[..., 0]``, entropy
    ``-(p * log p).sum(-1)``, lse ``z.logsumexp(-1)`` -- without materializing z.

    Args:
        hidden: (..., H) bf16/fp16/fp32 (fp64 on the torch backend). weight: (V, H), same dtype.
        targets: (...) ids in [0, V) or ``ignore_index`` (0 output, 0 gradient); (..., K) for
            K log-probs per row from one softmax (``z.log_softmax(-1).gather(-1, targets)``,
            e.g. a teacher's top-k ids); or None when only entropy/lse are wanted (every row
            counts). Entropy and lse are 0 on rows whose targets are all ignored.
        bias: (V,) or None. softcap: None or c > 0 (Gemma-style ``c * tanh(x / c)``).
        logit_scale: None or s > 0, applied before the softcap (Cohere ``logit_scale``,
            Granite ``1 / logits_scaling``, Falcon-H1 ``lm_head_multiplier``; see
            :func:`prefkern.integrations.hf_head_config`).
        temperature: a float > 0, or a tensor shaped like the rows (``hidden.shape[:-1]``)
            with one temperature per row (values > 0; not read on the host).
        return_stats: also the per-row statistics ``HeadStats(sum_p2, mean_logit,
            target_is_argmax)``: ``(p * p).sum(-1)`` (what verl's optimal-token baseline and
            TRL's WPO weights need: ``exp(lse(2z) - 2 lse(z))``), ``z.mean(-1)`` (TRL's
            "logits/chosen" metrics; z after scale, softcap and temperature), both fp32 with
            gradients, and ``z.argmax(-1) == y`` (bool shaped like targets, first maximal
            column on ties: TRL's token accuracy; None without targets). All from the same
            pass.
        mode: "fast" (bounded logits-slice buffer, cuBLAS GEMMs), "min_memory" (fused tiles,
            no logits buffer), or "auto" (= fast). The torch backend always runs chunked.
        deterministic: min_memory mode only: no atomics (lower parallelism in backward).
        skip_ignored: gather the rows with a valid target so that every GEMM runs on those
            only (prompts and padding cost nothing). The row count is read on the host: one
            device-to-host sync per call on an accelerator, so None (default) skips on CPU
            only; True asks for it everywhere. Never under torch.compile or CUDA-graph capture.
        process_group: a torch.distributed group over which the vocabulary is sharded
            (tensor/vocab parallelism): ``weight`` (and ``bias``) are this rank's contiguous
            rows ``[vocab_start, vocab_start + V_r)``, hidden and targets (global ids) are the
            same on every rank, and every rank gets the full-vocabulary results; one
            all-gather of a few floats per token forward, one all-reduce of dhidden backward
            (every rank must ask for the same gradients). ``vocab_start`` / ``vocab_size``
            (the full V): all-gathered and read on the host when not given. (..., K)
            targets: each rank picks the ids its shard owns (one all-reduce of (N, K)). A
            DTensor weight is gathered (``full_tensor()``:
            FSDP2's row shards live on data-parallel ranks whose tokens differ); with a
            process_group given, one sharded by rows (Shard(0)) on a 1-d mesh is used as
            vocab-parallel shards of the mesh's group. See prefkern.ops.vocab_parallel.
        backend: "auto" | "triton" | "torch" (None: $PREFKERN_BACKEND).
    Autocast: hidden, weight and bias are cast to the autocast dtype (the GEMM's autocast
    class), then everything runs with autocast off: the backward is the exact gradient of the
    forward wherever it runs.
    Returns:
        fp32 log-probs shaped like ``targets``; with ``return_entropy``/``return_lse`` (or
        targets None) a ``LinearLogprobsOutput(logprobs, entropy, lse)`` with None for what was
        not asked; with ``return_stats`` a ``HeadOutput(logprobs, entropy, lse, stats)``.
        Gradients flow to hidden, weight and bias from any upstream gradient on each
        output, in the input dtype with fp32 accumulation.
    """
    weight, bias, process_group, vocab_start, vocab_size = vocab_parallel.unwrap_dtensor_head(
        weight, bias, process_group, vocab_start, vocab_size)
    hidden, weight, bias = head_mod.autocast_inputs(hidden, weight, bias)
    device = head_mod.check_linear(hidden, weight, bias)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    lead = hidden.shape[:-1]
    temperature = head_mod.as_rows(temperature, lead)
    head_mod.check_temperature(temperature, lead, device)
    head_mod.check_logit_scale(logit_scale)
    if softcap is not None:
        _checks.check_positive("softcap", softcap)
    if targets is None and not (return_entropy or return_lse or return_stats):
        raise ValueError("targets=None computes no log-prob: ask for return_entropy, "
                         "return_lse or return_stats")
    vocab = weight.shape[0]
    if process_group is not None:
        start, vocab = vocab_parallel.shard_layout(weight, process_group, vocab_start,
                                                   vocab_size)
    flat, out_shape, bad, bad_rows, op_ignore = multi_target.prepare(
        targets, lead, vocab, ignore_index, "linear_logprobs", device)
    fp64 = hidden.dtype == torch.float64
    name = resolve_backend("linear_logprobs", backend, device,
                           ("torch",) if fp64 else ("triton", "torch"), () if fp64 else AUTO_ORDER)
    head = head_mod.fold(temperature, logit_scale, softcap, compute_dtype(hidden.dtype))

    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    options = (name, "fast" if mode == "auto" else mode, bool(deterministic), head.inv_temp,
               head.softcap, int(op_ignore), bool(return_entropy), bool(return_stats))
    if process_group is not None:
        *outs, stats = vocab_parallel.VocabParallelLogprobs.apply(
            _contiguous(hidden2d), weight.contiguous(), bias, flat, head.row_inv_temp,
            process_group, start, vocab, *options[:6], bool(return_stats))
        hit = softmax_stats.target_hits(stats, flat, int(op_ignore)) if return_stats else None
        outs = (*outs, stats, hit)
    else:
        rows = _valid_rows(flat, ignore_index) if targets is not None and \
            _skips(skip_ignored, device) else None
        if rows is None or rows.numel() == flat.shape[0]:
            outs = _fwd_op(_contiguous(hidden2d), weight.contiguous(), bias, flat,
                           head.row_inv_temp, *options)
        else:
            row_inv_temp = None if head.row_inv_temp is None else head.row_inv_temp[rows]
            outs = _fwd_op(hidden2d[rows], weight.contiguous(), bias, flat[rows], row_inv_temp,
                           *options)
            present = (True, True, True, return_stats, return_stats)  # (0, 4) when absent
            outs = [o.new_zeros((flat.shape[0], *o.shape[1:])).index_copy(0, rows, o) if there
                    else o for o, there in zip(outs, present, strict=True)]
    logp, entropy, lse, stats, hit = outs
    logp = None if out_shape is None else _checks.poison(logp.view(out_shape), bad)
    if return_stats:
        return HeadOutput(
            logp, _checks.poison(entropy.view(lead), bad_rows) if return_entropy else None,
            _checks.poison(lse.view(lead), bad_rows) if return_lse else None,
            head_mod.head_stats(stats, hit, lead, out_shape, bad_rows))
    if targets is not None and not (return_entropy or return_lse):
        return logp
    return LinearLogprobsOutput(
        logp, _checks.poison(entropy.view(lead), bad_rows) if return_entropy else None,
        _checks.poison(lse.view(lead), bad_rows) if return_lse else None)
