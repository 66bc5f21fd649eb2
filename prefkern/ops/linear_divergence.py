"""Per-token full-vocabulary divergence between a policy and a reference (teacher) model, from
their hidden states and LM-head weights, without the (N, V) logits of either.

Replaces ``a = (h @ W.T).float().div(T).log_softmax(-1); b = (h_ref @ W_ref.T).float().div(T)
.log_softmax(-1); kl = (b.exp() * (b - a)).sum(-1)`` and the other kinds of
:mod:`prefkern.reference.divergence` (see :func:`prefkern.reference.linear_divergence_ref`).
Passes: prefkern.ops.divergence_passes. Numerics: both sides' logits are accumulated in fp32 and
never rounded to the input dtype; only the d-logits fed to the gradient GEMMs are.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from prefkern import _checks
from prefkern._autocast import without_autocast
from prefkern.dispatch import resolve_backend
from prefkern.ops import divergence_passes as passes
from prefkern.ops import head as head_mod
from prefkern.ops import multi_target
from prefkern.outputs import DivergenceOutput
from prefkern.reference.divergence import Divergence, resolve_kind
from prefkern.reference.logprobs import compute_dtype

AUTO_ORDER = ("triton",)
MODES = ("auto", "fast", "min_memory")


class Passes(NamedTuple):
    forward: Callable
    backward: Callable


def _impl(backend: str, mode: str, deterministic: bool = False) -> Passes:
    """The passes of a backend and mode: forward/backward with divergence_passes' signatures
    (the torch backend has one chunked implementation for both modes)."""
    if backend != "triton":
        return Passes(passes.forward, passes.backward)
    if mode == "min_memory":
        from prefkern.ops import divergence_min_memory as fused

        return Passes(fused.forward, functools.partial(fused.backward,
                                                       deterministic=deterministic))
    from prefkern.ops import divergence_triton

    return Passes(divergence_triton.forward, divergence_triton.backward)


def _full_biases(ref_biases, ref_bias_at, k):
    """The custom ops take the present reference biases and their member indices (a list of
    optional tensors would not round-trip through autograd) -> one entry per member."""
    full = [None] * k
    for i, b in zip(ref_bias_at, ref_biases, strict=True):
        full[i] = b
    return full


def _sides(hidden, weight, bias, ref_hiddens, ref_weights, ref_biases, ref_bias_at, ref_coeffs):
    policy = passes.Side(hidden, weight, bias)
    k = len(ref_hiddens)
    coeffs = ref_coeffs if ref_coeffs else [None] * k
    refs = [passes.Side(*parts) for parts in zip(
        ref_hiddens, ref_weights, _full_biases(ref_biases, ref_bias_at, k), coeffs, strict=True)]
    return policy, refs


def _heads(row_inv_temp, ref_row_inv_temp, inv_temp, softcap, ref_inv_temp, ref_softcap):
    return (passes.HeadArgs(inv_temp if row_inv_temp is None else row_inv_temp, softcap),
            passes.HeadArgs(ref_inv_temp if ref_row_inv_temp is None else ref_row_inv_temp,
                            ref_softcap))


# torch.library custom ops: torch.compile(fullgraph=True) sees opaque, fake-able passes
@torch.library.custom_op("prefkern::linear_divergence_fwd", mutates_args=())
def _fwd_op(hidden: Tensor, weight: Tensor, bias: Tensor | None, ref_hiddens: list[Tensor],
            ref_weights: list[Tensor], ref_biases: list[Tensor], ref_bias_at: list[int],
            ref_coeffs: list[Tensor],
            targets: Tensor, row_inv_temp: Tensor | None, ref_row_inv_temp: Tensor | None,
            backend: str, mode: str, deterministic: bool, kind: str, beta: float,
            alpha: float, inv_temp: float, softcap: float | None, ref_inv_temp: float,
            ref_softcap: float | None, ignore_index: int, need_q: bool) -> list[Tensor]:
    """-> [divergence, logp] + the row statistics of divergence_passes.forward_rows, each (N,)
    in the compute dtype."""
    policy, refs = _sides(hidden, weight, bias, ref_hiddens, ref_weights, ref_biases,
                          ref_bias_at, ref_coeffs)
    head_p, head_q = _heads(row_inv_temp, ref_row_inv_temp, inv_temp, softcap, ref_inv_temp,
                            ref_softcap)
    with without_autocast(hidden):
        return list(_impl(backend, mode).forward(policy, refs, targets, head_p, head_q,
                                           resolve_kind(kind, beta, alpha), ignore_index,
                                           need_q))


@_fwd_op.register_fake
def _(hidden, weight, bias, ref_hiddens, ref_weights, ref_biases, ref_bias_at, ref_coeffs,
      targets,
      row_inv_temp, ref_row_inv_temp, *options):
    return [hidden.new_empty(hidden.shape[0], dtype=compute_dtype(hidden.dtype))
            for _ in range(8)]


@torch.library.custom_op("prefkern::linear_divergence_bwd", mutates_args=())
def _bwd_op(hidden: Tensor, weight: Tensor, bias: Tensor | None, ref_hiddens: list[Tensor],
            ref_weights: list[Tensor], ref_biases: list[Tensor], ref_bias_at: list[int],
            ref_coeffs: list[Tensor],
            targets: Tensor, row_inv_temp: Tensor | None, ref_row_inv_temp: Tensor | None,
            stats: list[Tensor], g_div: Tensor | None, g_logp: Tensor | None, backend: str,
            mode: str, deterministic: bool, kind: str, beta: float, alpha: float,
            inv_temp: float, softcap: float | None, ref_inv_temp: float,
            ref_softcap: float | None, ignore_index: int, need_dh: bool, need_dw: bool,
            need_db: bool, need_ref: bool) -> list[Tensor]:
    """-> the policy's [dh, dW, db] that are needed, then (need_ref) [dh, dW, db (if a bias)]
    of each reference side."""
    policy, refs = _sides(hidden, weight, bias, ref_hiddens, ref_weights, ref_biases,
                          ref_bias_at, ref_coeffs)
    head_p, head_q = _heads(row_inv_temp, ref_row_inv_temp, inv_temp, softcap, ref_inv_temp,
                            ref_softcap)
    with without_autocast(hidden):
        grads = _impl(backend, mode, deterministic).backward(
            policy, refs, targets, head_p, head_q, resolve_kind(kind, beta, alpha),
            ignore_index, stats, g_div, g_logp, (need_dh, need_dw, need_db), need_ref)
    return [g for g in grads if g is not None]


@_bwd_op.register_fake
def _(hidden, weight, bias, ref_hiddens, ref_weights, ref_biases, ref_bias_at, ref_coeffs,
      targets,
      row_inv_temp, ref_row_inv_temp, stats, g_div, g_logp, backend, mode, deterministic, kind,
      beta, alpha,
      inv_temp, softcap, ref_inv_temp, ref_softcap, ignore_index, need_dh, need_dw, need_db,
      need_ref):
    out = [torch.empty_like(t) for t, needed in
           zip((hidden, weight, bias), (need_dh, need_dw, need_db and bias is not None),
               strict=True) if needed]
    if need_ref:
        biases = _full_biases(ref_biases, ref_bias_at, len(ref_hiddens))
        for h, w, b in zip(ref_hiddens, ref_weights, biases, strict=True):
            out += [torch.empty_like(t) for t in (h, w, b) if t is not None]
    return out


def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, ref_hiddens, ref_weights, ref_biases, ref_bias_at, ref_coeffs,
     targets, row_inv_temp, ref_row_inv_temp, *options) = inputs
    # backend, mode, deterministic, kind, beta, alpha, inv_temp, softcap, ref_inv_temp,
    # ref_softcap, ignore_index
    ctx.options = options[:-1]
    ctx.n_refs, ctx.n_coeffs = len(ref_hiddens), len(ref_coeffs)
    ctx.ref_bias_at = list(ref_bias_at)
    ctx.save_for_backward(hidden, weight, bias, targets, row_inv_temp, ref_row_inv_temp,
                          *output[2:], *ref_hiddens, *ref_weights, *ref_coeffs,
                          *ref_biases)


def _unpack_refs(ctx, rest):
    k = ctx.n_refs
    ref_hiddens, ref_weights = list(rest[:k]), list(rest[k:2 * k])
    ref_coeffs = list(rest[2 * k:2 * k + ctx.n_coeffs])
    ref_biases = list(rest[2 * k + ctx.n_coeffs:])
    return ref_hiddens, ref_weights, ref_biases, ref_coeffs


def _backward(ctx, grad_outputs):
    g_div, g_logp = grad_outputs[0], grad_outputs[1]
    hidden, weight, bias, targets, row_inv_temp, ref_row_inv_temp, *rest = ctx.saved_tensors
    stats, rest = list(rest[:6]), rest[6:]
    ref_hiddens, ref_weights, ref_biases, ref_coeffs = _unpack_refs(ctx, rest)
    need = list(ctx.needs_input_grad[:3])
    need[2] = need[2] and bias is not None
    need_ref = any(flag for item in ctx.needs_input_grad[3:6]  # per-tensor lists
                   for flag in (item if isinstance(item, (list, tuple)) else (item,)))
    # ref_bias_at, ref_coeffs, targets, the two temperatures and the 12 options: no gradient
    # (autograd's pytree sees a non-empty int list as one leaf, an empty one as a list)
    no_grads = (None if ctx.ref_bias_at else [], [None] * ctx.n_coeffs, *(None,) * 15)
    empty, empty_b = [None] * ctx.n_refs, [None] * len(ref_biases)
    if not (any(need) or need_ref) or (g_div is None and g_logp is None):
        return (None, None, None, empty, empty, empty_b, *no_grads)
    g_div, g_logp = (None if g is None else g.to(stats[0].dtype).contiguous()
                     for g in (g_div, g_logp))
    grads = iter(_bwd_op(hidden, weight, bias, ref_hiddens, ref_weights, ref_biases,
                         ctx.ref_bias_at, ref_coeffs, targets, row_inv_temp,
                         ref_row_inv_temp, stats, g_div, g_logp, *ctx.options, *need,
                         need_ref))
    dh, dw, db = (next(grads) if needed else None for needed in need)
    ref_dh, ref_dw, ref_db = list(empty), list(empty), list(empty_b)
    if need_ref:
        for k in range(ctx.n_refs):
            ref_dh[k], ref_dw[k] = next(grads), next(grads)
            if k in ctx.ref_bias_at:
                ref_db[ctx.ref_bias_at.index(k)] = next(grads)
    return (dh, dw, db, ref_dh, ref_dw, ref_db, *no_grads)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def reference_sides(ref_hidden, ref_weight, ref_bias, lead, device, dtype):
    """-> (hiddens, weights, biases, coeffs) of the reference side: one head, or a mixture
    given as a sequence of (hidden, weight, coeff[, bias])."""
    if isinstance(ref_hidden, Tensor):
        if ref_weight is None:
            raise ValueError("ref_weight is required when ref_hidden is a tensor")
        members, mixture = [(ref_hidden, ref_weight, None, ref_bias)], False
    elif isinstance(ref_hidden, Sequence) and len(ref_hidden) > 0:
        if ref_weight is not None or ref_bias is not None:
            raise ValueError("a mixture carries its weights and biases in its members: pass "
                             "ref_weight=None and ref_bias=None")
        members, mixture = [], True
        for member in ref_hidden:
            if not isinstance(member, Sequence) or len(member) not in (3, 4):
                raise ValueError("each mixture member must be (hidden, weight, coeff) or "
                                 "(hidden, weight, coeff, bias)")
            members.append((*member[:3], member[3] if len(member) == 4 else None))
    else:
        raise TypeError("ref_hidden must be a tensor or a non-empty sequence of "
                        "(hidden, weight, coeff[, bias])")
    hiddens, weights, biases, coeffs = [], [], [], []
    for k, (h, w, coeff, b) in enumerate(members):
        h, w, b = head_mod.autocast_inputs(h, w, b)
        names = ("ref_hidden", "ref_weight", "ref_bias") if not mixture else \
            tuple(f"ref_hidden[{k}].{part}" for part in ("hidden", "weight", "bias"))
        if head_mod.check_linear(h, w, b, names) != device:
            raise ValueError(f"{names[0]} is on another device than hidden ({device})")
        if h.shape[:-1] != lead:
            raise ValueError(f"{names[0]} must have the rows of hidden, {tuple(lead)}, got "
                             f"{tuple(h.shape[:-1])}")
        if h.dtype != dtype:
            raise TypeError(f"{names[0]} dtype {h.dtype} must match hidden dtype {dtype}")
        hiddens.append(h.reshape(-1, h.shape[-1]).contiguous())
        weights.append(w.contiguous())
        biases.append(b)
        if mixture:
            coeffs.append(_coefficient(coeff, lead, device, k, compute_dtype(dtype)))
    return hiddens, weights, biases, coeffs


def _coefficient(coeff, lead, device, k, dtype) -> Tensor:
    """A mixture coefficient as (N,) in the compute dtype: a float for every row, or one value
    per row."""
    if isinstance(coeff, Tensor):
        _checks.check_float(f"coefficient {k}", coeff)
        if coeff.requires_grad:
            raise ValueError("mixture coefficients take no gradient: pass coeff.detach()")
        if coeff.shape not in (lead, ()):
            raise ValueError(f"coefficient {k} must be a float or shaped like the rows "
                             f"{tuple(lead)}, got {tuple(coeff.shape)}")
        if coeff.device != device:
            raise ValueError(f"coefficient {k} is on {coeff.device}, the inputs on {device}")
        return coeff.expand(lead).reshape(-1).to(dtype).contiguous()
    return torch.full((lead.numel(),), float(coeff), dtype=dtype, device=device)


class Prepared(NamedTuple):
    """A validated call: flat (N, H) / (N,) tensors, reference lists, folded heads."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    ref_hiddens: list[Tensor]
    ref_weights: list[Tensor]
    ref_biases: list[Tensor | None]
    ref_coeffs: list[Tensor]
    targets: Tensor
    bad: Tensor | None
    lead: torch.Size
    div: Divergence
    head_p: head_mod.Head
    head_q: head_mod.Head
    backend: str
    ignore_index: int


def prepare(hidden, weight, ref_hidden, ref_weight, targets, kind, beta, alpha, temperature,
            ignore_index, bias, ref_bias, softcap, logit_scale, ref_softcap, ref_logit_scale,
            backend, op: str, vocab: int | None = None) -> Prepared:
    """Validation and argument folding shared by linear_divergence and the fused losses:
    clear errors before any kernel, no host sync. ``vocab``: the full vocabulary when the
    weights are shards (targets are checked against it)."""
    hidden, weight, bias = head_mod.autocast_inputs(hidden, weight, bias)
    device = head_mod.check_linear(hidden, weight, bias)
    div = resolve_kind(kind, beta, alpha)
    lead = hidden.shape[:-1]
    ref_hiddens, ref_weights, ref_biases, ref_coeffs = reference_sides(
        ref_hidden, ref_weight, ref_bias, lead, device, hidden.dtype)
    if any(w.shape[0] != weight.shape[0] for w in ref_weights):
        raise ValueError(f"the reference vocabulary must match the policy's, V = "
                         f"{weight.shape[0]}, got {[w.shape[0] for w in ref_weights]}")
    temperature = head_mod.as_rows(temperature, lead)
    head_mod.check_temperature(temperature, lead, device)
    head_mod.check_logit_scale(logit_scale)
    head_mod.check_logit_scale(ref_logit_scale)
    for name, value in (("softcap", softcap), ("ref_softcap", ref_softcap)):
        if value is not None:
            _checks.check_positive(name, value)
    if targets is not None:
        _checks.check_index("targets", targets)
    if targets is not None and targets.shape != lead:
        raise ValueError(f"targets must have the rows' shape {tuple(lead)}, got "
                         f"{tuple(targets.shape)}")
    flat, _, bad, _, op_ignore = multi_target.prepare(
        targets, lead, weight.shape[0] if vocab is None else vocab, ignore_index, op, device)
    fp64 = hidden.dtype == torch.float64
    name = resolve_backend(op, backend, device,
                           ("torch",) if fp64 else ("triton", "torch"), () if fp64 else AUTO_ORDER)
    cdt = compute_dtype(hidden.dtype)
    return Prepared(hidden.reshape(-1, hidden.shape[-1]).contiguous(), weight.contiguous(), bias,
                    ref_hiddens, ref_weights, ref_biases, ref_coeffs, flat, bad, lead, div,
                    head_mod.fold(temperature, logit_scale, softcap, cdt),
                    head_mod.fold(temperature, ref_logit_scale, ref_softcap, cdt), name,
                    int(op_ignore))


def linear_divergence(hidden: Tensor, weight: Tensor, ref_hidden, ref_weight: Tensor | None,
                      targets: Tensor | None = None, *, kind: str = "forward_kl",
                      beta: float = 0.5, alpha: float = 0.5, temperature: float | Tensor = 1.0,
                      ignore_index: int = -100, bias: Tensor | None = None,
                      ref_bias: Tensor | None = None, softcap: float | None = None,
                      logit_scale: float | None = None, ref_softcap: float | None = None,
                      ref_logit_scale: float | None = None, return_logprobs: bool = False,
                      mode: str = "auto", deterministic: bool = False, process_group=None,
                      vocab_start: int | None = None, vocab_size: int | None = None,
                      backend: str | None = None):
    """Per-token divergence between p = softmax(z_p) (the policy / student, which takes the
    gradient) and q = softmax(z_q) (the reference / teacher) over the whole vocabulary.

    ``z_p = softcap(logit_scale * (hidden @ weight.T + bias)) / T`` and z_q likewise from the
    ``ref_*`` arguments; a, b = log p, log q. Kinds (prefkern.reference.divergence):
      forward_kl  KL(q || p) = (q * (b - a)).sum(-1)   (teacher -> student: distillation)
      reverse_kl  KL(p || q) = (p * (a - b)).sum(-1)   (the KL penalty of RL)
      jsd         beta * KL(q || m) + (1 - beta) * KL(p || m), m = (1 - beta) p + beta q
                  (TRL GKD's generalized JSD: beta = 0 is forward_kl, beta = 1 reverse_kl)
      tv          0.5 * (p - q).abs().sum(-1)
      alpha       (1 - (p**alpha * q**(1 - alpha)).sum(-1)) / (alpha * (1 - alpha))
                  (alpha = 0 is forward_kl, alpha = 1 reverse_kl)

    Args:
        hidden: (..., H) bf16/fp16/fp32 (fp64 on the torch backend); weight (V, H), bias (V,).
        ref_hidden, ref_weight, ref_bias: the reference head, same rows and V (its H may
            differ); or ``ref_hidden`` a sequence of (hidden, weight, coeff[, bias]) whose raw
            logits are mixed per row before the head, ``z_q = head(sum_k coeff_k * (h_k @
            W_k.T + b_k))``, coeff a float or one value per row (e.g. AlignDistil's
            interpolation); then ``ref_weight=None``.
        targets: (...) ids: ``ignore_index`` rows give 0 and take no gradient; with
            ``return_logprobs`` the policy's log-prob of each target comes from the same pass.
            None: every row counts.
        temperature: a float > 0 or one value per row, dividing both sides (TRL GKD, Liger).
        softcap / logit_scale: the policy's head; ref_softcap / ref_logit_scale: the
            reference's (see prefkern.integrations.hf_head_config).
        mode: "auto" / "fast": chunks of rows forward, vocabulary slices backward (cuBLAS
            GEMMs + Triton row kernels on the Triton backend; one logits slice per side).
            "min_memory" (Triton): fused kernels keep both sides' logit tiles on chip
            (prefkern.ops.divergence_min_memory): no (N, V) or (N, C) buffer, FLOPs 2NHV per
            side forward (twice for jsd / tv), 8NHV per side that takes a gradient backward;
            one reference head. Both modes compute the same function (fp32 logits). The
            torch backend runs its chunked passes for either mode.
        deterministic: min_memory mode only: no atomics backward (one program per gradient
            block: bitwise stable across runs, less parallel); the other paths are already.
        process_group: vocab parallelism as in :func:`prefkern.linear_logprobs`: weight,
            bias, ref_weight and ref_bias are this rank's rows [vocab_start, vocab_start +
            V_r) (the same rows of both heads), everything else is the same on every rank;
            two collectives per chunk of rows forward (the row math runs in torch ops on
            every backend), an fp32 all-reduce of the hidden states' gradients backward. One
            reference head (no mixture). See prefkern.ops.vocab_parallel_divergence.
        backend: "auto" | "triton" | "torch" (None: $PREFKERN_BACKEND).
    Returns:
        the divergence (...) fp32, or ``DivergenceOutput(divergence, logprobs)`` with
        ``return_logprobs``. Gradients flow to hidden, weight and bias for any upstream
        gradient on either output, and to the reference side's tensors that require grad.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "min_memory" and not isinstance(ref_hidden, Tensor):
        raise ValueError("mode='min_memory' takes one reference head; a mixture runs in "
                         "mode='fast'")
    if mode == "min_memory" and process_group is not None:
        raise ValueError("mode='min_memory' does not combine with process_group (the "
                         "vocab-parallel passes merge row chunks across ranks in torch)")
    vocab = None
    if process_group is not None:
        from prefkern.ops import vocab_parallel

        start, vocab = vocab_parallel.shard_layout(weight, process_group, vocab_start,
                                                   vocab_size)
        if not isinstance(ref_hidden, Tensor):
            raise ValueError("a reference mixture is not supported with process_group")
    c = prepare(hidden, weight, ref_hidden, ref_weight, targets, kind, beta, alpha, temperature,
                ignore_index, bias, ref_bias, softcap, logit_scale, ref_softcap, ref_logit_scale,
                backend, "linear_divergence", vocab)
    if process_group is not None:
        return _vocab_parallel(c, targets, return_logprobs, process_group, start, vocab)
    need_q = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (*c.ref_hiddens, *c.ref_weights,
                                                    *c.ref_biases))
    ref_bias_at = [k for k, b in enumerate(c.ref_biases) if b is not None]
    out = _fwd_op(c.hidden, c.weight, c.bias, c.ref_hiddens, c.ref_weights,
                  [c.ref_biases[k] for k in ref_bias_at], ref_bias_at, c.ref_coeffs, c.targets,
                  c.head_p.row_inv_temp, c.head_q.row_inv_temp, c.backend,
                  "fast" if mode == "auto" else mode, bool(deterministic), c.div.kind,
                  c.div.beta, c.div.alpha, c.head_p.inv_temp, c.head_p.softcap,
                  c.head_q.inv_temp, c.head_q.softcap, c.ignore_index, need_q)
    divergence = _checks.poison(out[0].view(c.lead), c.bad)
    if not return_logprobs:
        return divergence
    logprobs = None if targets is None else _checks.poison(out[1].view(c.lead), c.bad)
    return DivergenceOutput(divergence, logprobs)


def _vocab_parallel(c: Prepared, targets, return_logprobs, group, start, vocab):
    from prefkern.ops.vocab_parallel_divergence import VocabParallelDivergence

    head_p, head_q = _heads(c.head_p.row_inv_temp, c.head_q.row_inv_temp, c.head_p.inv_temp,
                            c.head_p.softcap, c.head_q.inv_temp, c.head_q.softcap)
    with without_autocast(c.hidden):
        div, logp = VocabParallelDivergence.apply(
            c.hidden, c.weight, c.bias, c.ref_hiddens[0], c.ref_weights[0], c.ref_biases[0],
            c.targets, head_p, head_q, c.div, c.ignore_index, group, start, vocab, c.backend)
    divergence = _checks.poison(div.view(c.lead), c.bad)
    if not return_logprobs:
        return divergence
    logprobs = None if targets is None else _checks.poison(logp.view(c.lead), c.bad)
    return DivergenceOutput(divergence, logprobs)
