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
from prefkern._autocast import autocast_dtype, without_autocast
from prefkern.dispatch import resolve_backend
from prefkern.ops import softmax_stats, torch_chunked
from prefkern.outputs import LinearLogprobsOutput
from prefkern.reference.logprobs import compute_dtype

AUTO_ORDER = ("triton",)
MODES = ("auto", "fast", "min_memory")


def _impl(backend: str, mode: str, deterministic: bool):
    """-> (fwd, bwd) callables of one backend/mode (same signatures as torch_chunked's)."""
    if backend == "torch":
        return torch_chunked.linear_forward, torch_chunked.linear_backward
    if mode == "min_memory":
        from prefkern._kernels import linear_logprobs_fused as fused

        def fused_forward(hidden, weight, bias, targets, inv_temp, softcap, ignore_index):
            m, s, u, z_target = fused.linear_logprobs_fwd(hidden, weight, bias, targets,
                                                          inv_temp, softcap, ignore_index)
            return softmax_stats.finish(*softmax_stats.merge_along(m, s, u), z_target.sum(0),
                                        targets != ignore_index)

        return fused_forward, functools.partial(fused.linear_logprobs_bwd,
                                                deterministic=deterministic)
    from prefkern.ops import linear_sliced

    return linear_sliced.forward, linear_sliced.backward


# The passes are torch.library custom ops so that torch.compile(fullgraph=True) sees opaque,
# fake-able calls (no graph breaks on the kernel launches or the chunk loops).
@torch.library.custom_op("prefkern::linear_logprobs_fwd", mutates_args=())
def _fwd_op(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, backend: str,
            mode: str, deterministic: bool, inv_temp: float, softcap: float | None,
            ignore_index: int, with_entropy: bool) -> tuple[Tensor, Tensor, Tensor]:
    """-> (logp, entropy, lse), each (N,); entropy is zeros unless with_entropy (the torch
    backend then skips it; the kernels compute it anyway, it costs them nothing).
    ``deterministic`` only matters to the backward."""
    fwd, _ = _impl(backend, mode, False)
    extra = (with_entropy,) if backend == "torch" else ()
    with without_autocast(hidden):
        logp, entropy, lse = fwd(hidden, weight, bias, targets, inv_temp, softcap, ignore_index,
                                 *extra)
    if not with_entropy or entropy is None:
        entropy = torch.zeros_like(logp)
    return logp, entropy, lse


@_fwd_op.register_fake
def _(hidden, weight, bias, targets, backend, mode, deterministic, inv_temp, softcap,
      ignore_index, with_entropy):
    dtype = compute_dtype(hidden.dtype)
    return tuple(hidden.new_empty(hidden.shape[0], dtype=dtype) for _ in range(3))


@torch.library.custom_op("prefkern::linear_logprobs_bwd", mutates_args=())
def _bwd_op(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, lse: Tensor,
            entropy: Tensor, g_logp: Tensor | None, g_ent: Tensor | None, g_lse: Tensor | None,
            backend: str, mode: str, deterministic: bool, inv_temp: float,
            softcap: float | None, ignore_index: int, need_dh: bool, need_dw: bool,
            need_db: bool) -> list[Tensor]:
    """-> [dhidden if need_dh, dweight if need_dw, dbias if need_db]."""
    _, bwd = _impl(backend, mode, deterministic)
    with without_autocast(hidden):
        grads = bwd(hidden, weight, bias, targets, lse, entropy, g_logp, g_ent, g_lse, inv_temp,
                    softcap, ignore_index, need_dh=need_dh, need_dw=need_dw, need_db=need_db)
    return [g for g, needed in zip(grads, (need_dh, need_dw, need_db), strict=True) if needed]


@_bwd_op.register_fake
def _(hidden, weight, bias, targets, lse, entropy, g_logp, g_ent, g_lse, backend, mode,
      deterministic, inv_temp, softcap, ignore_index, need_dh, need_dw, need_db):
    return [torch.empty_like(t) for t, needed in zip((hidden, weight, bias),
                                                     (need_dh, need_dw, need_db), strict=True)
            if needed]


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, *options = inputs
    *ctx.options, ctx.with_entropy = options  # backend, mode, deterministic, inv_temp,
    # softcap, ignore_index
    ctx.save_for_backward(hidden, weight, bias, targets, output[2], output[1])


def _backward(ctx, g_logp, g_ent, g_lse):
    hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
    backend, mode, deterministic, inv_temp, softcap, ignore_index = ctx.options
    need = list(ctx.needs_input_grad[:3])
    need[2] = need[2] and bias is not None
    no_grads = (None,) * 8  # targets and the options
    if not ctx.with_entropy:
        g_ent = None  # the caller never saw the entropy: any gradient for it is zeros
    if not any(need) or all(g is None for g in (g_logp, g_ent, g_lse)):
        return (None, None, None, *no_grads)
    g_logp, g_ent, g_lse = (None if g is None else g.to(lse.dtype).contiguous()
                            for g in (g_logp, g_ent, g_lse))
    grads = iter(_bwd_op(hidden, weight, bias, targets, lse, entropy, g_logp, g_ent, g_lse,
                         backend, mode, deterministic, inv_temp, softcap, ignore_index, *need))
    dh, dw, db = (next(grads) if needed else None for needed in need)
    return (dh, dw, db, *no_grads)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _validate(hidden, weight, targets, bias, temperature, softcap, mode):
    _checks.check_float("hidden", hidden)
    _checks.check_float("weight", weight)
    _checks.check_index("targets", targets)
    if hidden.dim() < 1:
        raise ValueError("hidden must be (..., H)")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"weight must be (V, H) with H = hidden.shape[-1] = {hidden.shape[-1]} "
                         f"and V > 0, got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal hidden.shape[:-1] = "
                         f"{tuple(hidden.shape[:-1])}")
    if bias is not None:
        _checks.check_float("bias", bias)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must match hidden dtype {hidden.dtype}")
    _checks.check_positive("temperature", temperature)
    if softcap is not None:
        _checks.check_positive("softcap", softcap)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return _checks.check_same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)


def _autocast_inputs(hidden, weight, bias):
    """Under autocast the LM-head GEMM takes the autocast dtype, as ``F.linear`` would: half and
    single precision inputs are cast (fp64 is left alone, as autocast does)."""
    dtype = autocast_dtype(hidden.device) if isinstance(hidden, Tensor) else None
    if dtype is None:
        return hidden, weight, bias
    cast = (torch.float16, torch.bfloat16, torch.float32)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.dtype in cast else t
                 for t in (hidden, weight, bias))


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    bias: torch.Tensor | None = None, *, temperature: float = 1.0,
                    ignore_index: int = -100, softcap: float | None = None,
                    return_entropy: bool = False, return_lse: bool = False, mode: str = "auto",
                    deterministic: bool = False, backend: str | None = "auto"):
    """Per-token log-prob of ``targets`` under ``softmax(softcap(hidden @ weight.T + bias) / T)``.

    ``z = softcap * tanh((hidden @ weight.T + bias).float() / softcap) / T;
    logp = z.log_softmax(-1).gather(-1, targets[..., None])[..., 0]``, entropy
    ``-(p * log p).sum(-1)``, lse ``z.logsumexp(-1)`` -- without materializing z.

    Args:
        hidden: (..., H) bf16/fp16/fp32 (fp64 on the torch backend). weight: (V, H), same dtype.
        targets: (...) ids in [0, V) or ``ignore_index`` (0 output, 0 gradient).
        bias: (V,) or None. softcap: None or c > 0 (Gemma-style ``c * tanh(x / c)``).
        mode: "fast" (bounded logits-slice buffer, cuBLAS GEMMs), "min_memory" (fused tiles,
            no logits buffer), or "auto" (= fast). The torch backend always runs chunked.
        deterministic: min_memory mode only: no atomics (lower parallelism in backward).
        backend: "auto" | "triton" | "torch" (None: $PREFKERN_BACKEND).
    Autocast: hidden, weight and bias are cast to the autocast dtype (the GEMM's autocast
    class), then everything runs with autocast off: the backward is the exact gradient of the
    forward wherever it runs.
    Returns:
        fp32 (...) log-probs; with ``return_entropy``/``return_lse`` a
        ``LinearLogprobsOutput(logprobs, entropy, lse)`` with None for what was not asked.
        Gradients flow to hidden, weight and bias from any upstream gradient on each output,
        in the input dtype with fp32 accumulation.
    """
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    device = _validate(hidden, weight, targets, bias, temperature, softcap, mode)
    vocab = weight.shape[0]
    targets, bad = _checks.screen_targets(targets, vocab, ignore_index, "linear_logprobs")
    fp64 = hidden.dtype == torch.float64
    name = resolve_backend("linear_logprobs", backend, device,
                           ("torch",) if fp64 else ("triton", "torch"), () if fp64 else AUTO_ORDER)

    lead = hidden.shape[:-1]
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    if not hidden2d.is_contiguous():
        hidden2d = hidden2d.contiguous()
    logp, entropy, lse = _fwd_op(
        hidden2d, weight.contiguous(), bias, targets.reshape(-1), name,
        "fast" if mode == "auto" else mode, bool(deterministic), 1.0 / float(temperature),
        None if softcap is None else float(softcap), int(ignore_index), bool(return_entropy))
    logp = _checks.poison(logp.view(lead), bad)
    if not (return_entropy or return_lse):
        return logp
    return LinearLogprobsOutput(logp,
                                _checks.poison(entropy.view(lead), bad) if return_entropy else None,
                                _checks.poison(lse.view(lead), bad) if return_lse else None)
