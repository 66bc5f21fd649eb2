"""The benchmark's correctness gate: every element of every checked tensor against the spec.

For one problem (one input, one mode):

    ref  = the spec (prefkern.reference) on the inputs upcast to fp64
    base = the spec on the inputs in their own dtype (fp32 math, gradients rounded to the
           input dtype): what a practitioner writes and, for linear_logprobs, prefkern's
           contract (logits accumulated in fp32, never rounded to bf16; the d-logits rounded
           to the input dtype once where they feed the dh/dW GEMMs)

and a provider's output ``out`` passes when prefkern.testing's rule holds over all elements:

    max|out - ref| <= 2 * max|base - ref| + floor(out.dtype, reduction) * max|ref|

with reduction = the vocabulary size for per-token outputs and per-row gradients (dlogits,
dhidden) and the token count for gradients summed over rows (dweight). Gradients are those of
``sum(logp * g_logp) + sum(entropy * g_ent)`` with the upstream gradients the providers used.

Memory: the reference runs on row chunks (tokens) through torch.autograd, so a chunk's (rows, V)
fp64 temporaries stay near CHUNK_BYTES (at N=8192, V=128256 one (N, V) fp64 tensor is 8 GB;
measured on CPU at V=128256 with the CUDA budget: 0.9 GiB per chunk; on CPU a 64 MiB budget
keeps the temporaries in cache, ~3x faster than 1 GiB chunks). Per-row results (log-probs,
entropy, dlogits, dhidden) are kept for the next provider when they fit in CACHE_BYTES, else
recomputed for each provider (dlogits at GPU shapes). Gradients of a whole input (dweight)
accumulate over the chunks in fp64 and are kept until the problem is done: during the pass the
fp64 weight, its fp64 gradient and one chunk's contribution are 3 (V, H) fp64 tensors (4.2 GB
each at V=128256, H=4096), plus the fp32 weight and gradient of the base.
rule_error on a chunk with base = ref gives floor * max|ref of the chunk|; the maximum over
chunks plus 2 * max|base - ref| is exactly rule_bound on the whole tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from prefkern.reference import (
    linear_divergence_ref,
    linear_logprobs_ref,
    logprobs_from_logits_ref,
)
from prefkern.testing import rule_error

# about the peak of one chunk's (rows, V) fp64 temporaries, per device type
CHUNK_BYTES = {"cuda": 1 << 30, "cpu": 64 << 20}
CACHE_BYTES = 1 << 30  # per-row fp64 results kept between providers up to this size
_LIVE_PER_ROW = 10  # (rows, V) fp64 tensors alive at once in a chunk's forward and backward


@dataclass
class TensorCheck:
    """The rule on one tensor: err = max|out - ref| over every element (inf when missing,
    misshaped or non-finite), bound = 2 * base_err + floor * max|ref|."""

    name: str
    err: float
    bound: float
    base_err: float
    ref_max: float
    why: str = ""

    @property
    def ok(self) -> bool:
        return self.err <= self.bound  # False for NaN

    @property
    def ratio(self) -> float:
        """err / bound: <= 1 passes."""
        if self.err == 0:
            return 0.0
        return self.err / self.bound if self.bound > 0 else math.inf

    @property
    def rel_err(self) -> float:
        if self.err == 0:
            return 0.0
        return self.err / self.ref_max if self.ref_max > 0 else math.inf


class _Worst:
    """Running maxima of one tensor's error and floor term over chunks."""

    def __init__(self):
        self.err = self.floor = self.ref_max = 0.0

    def add(self, out: torch.Tensor | None, ref: torch.Tensor, reduction: int) -> None:
        if ref.numel():
            self.ref_max = max(self.ref_max, ref.abs().max().item())
        if out is None:
            return
        err, floor, _ = rule_error(out, ref, ref, reduction)  # base = ref: the floor term alone
        self.err = max(self.err, err) if err == err else math.nan
        self.floor = max(self.floor, floor)


def _chunk_bytes(device: torch.device) -> int:
    return CHUNK_BYTES.get(device.type, CHUNK_BYTES["cpu"])


def _blocks(t: torch.Tensor) -> Iterator[slice]:
    """Row blocks of ``t`` whose fp64 copies stay near the chunk budget / 4."""
    row_bytes = 8 * max(1, t[0].numel() if t.dim() else 1)
    step = max(1, _chunk_bytes(t.device) // (4 * row_bytes))
    for r0 in range(0, max(1, t.shape[0] if t.dim() else 1), step):
        yield slice(r0, r0 + step)


class ChunkedReference:
    """fp64 reference and input-dtype base of one problem, computed in row chunks.

    ``spec(**inputs, targets=...)`` returns the per-token outputs named ``output_names`` (a
    prefkern.reference function). ``row_inputs`` (name -> tensor whose rows are tokens, e.g.
    logits or hidden) are sliced by chunk; ``shared_inputs`` (e.g. the LM head) go whole and
    their gradients are summed over chunks. ``upstream`` (output name -> gradient or None) turns
    the gradients on; they are named "d" + input name. ``frozen_rows``: row inputs that take
    no gradient (a teacher's hidden states). ``optional_outputs``: per-token outputs a provider
    may leave out (None) when it returns a reduced loss only; its gradients are still checked.
    :meth:`check` compares a provider."""

    def __init__(self, spec: Callable, row_inputs: dict, shared_inputs: dict,
                 targets: torch.Tensor, upstream: dict | None, output_names: tuple,
                 vocab: int, chunk_rows: int | None = None, cache_bytes: int = CACHE_BYTES,
                 frozen_rows: dict | None = None, optional_outputs: tuple = ()):
        self.spec, self.targets = spec, targets
        self.frozen_rows = dict(frozen_rows or {})
        self.optional_outputs = tuple(optional_outputs)
        self.row_inputs, self.shared_inputs = dict(row_inputs), dict(shared_inputs)
        self.upstream = {k: v for k, v in (upstream or {}).items() if v is not None}
        self.with_grad = upstream is not None
        if self.with_grad and not self.upstream:
            raise ValueError("upstream gradients given, but all None")
        self.output_names = tuple(output_names)
        self.row_grads = tuple(f"d{k}" for k in self.row_inputs) if self.with_grad else ()
        self.shared_grads = tuple(f"d{k}" for k in self.shared_inputs) if self.with_grad else ()
        n = targets.shape[0]
        self.reduction = {**{k: vocab for k in (*self.output_names, *self.row_grads)},
                          **{k: n for k in self.shared_grads}}
        self.shapes = {**{k: (n,) for k in self.output_names},
                       **{f"d{k}": tuple(v.shape) for k, v in self.row_inputs.items()},
                       **{f"d{k}": tuple(v.shape) for k, v in self.shared_inputs.items()}}
        self.chunk_rows = chunk_rows or max(
            1, _chunk_bytes(targets.device) // (_LIVE_PER_ROW * 8 * vocab))
        per_row = 8 * (len(self.output_names) * n + sum(
            v.numel() for v in self.row_inputs.values()) * self.with_grad)
        self._cacheable = per_row <= cache_bytes
        self._cache: list | None = None  # [(rows, {name: fp64 chunk})] once computed
        self._shared: dict[str, torch.Tensor] = {}  # fp64 gradients of the shared inputs
        self._base_err: dict[str, float] | None = None
        # the base computes in fp32 (fp64 for fp64 inputs), as the spec on the inputs' dtype
        (self._base_dtype,) = {_compute_dtype(v.dtype) for v in self.row_inputs.values()}

    @property
    def grad_names(self) -> tuple:
        """Gradient names in the order of the inputs (row inputs, then shared ones)."""
        return (*self.row_grads, *self.shared_grads)

    def release(self) -> None:
        """Drop the kept results (the next check recomputes them)."""
        self._cache, self._shared = None, {}

    # -- the reference ---------------------------------------------------------------------

    def _leaves(self, inputs: dict, rows, dtype) -> dict:
        return {k: (v if rows is None else v[rows]).detach().to(dtype)
                .requires_grad_(self.with_grad) for k, v in inputs.items()}

    def _eval(self, rows: slice, dtype: torch.dtype, shared: dict, base: bool) -> dict:
        leaves = self._leaves(self.row_inputs, rows, dtype)
        frozen = {k: v[rows].detach().to(dtype) for k, v in self.frozen_rows.items()}
        with torch.set_grad_enabled(self.with_grad):
            outs = self.spec(**leaves, **frozen, **shared, targets=self.targets[rows])
            outs = dict(zip(self.output_names, outs, strict=True))
            if self.with_grad:
                pairs = [(outs[k], g[rows].to(outs[k].dtype)) for k, g in self.upstream.items()]
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        res = {k: o.detach() for k, o in outs.items()}
        for k, leaf in leaves.items():
            if self.with_grad:
                grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
                res[f"d{k}"] = grad.to(self.row_inputs[k].dtype) if base else grad
        return res

    def _pass(self) -> Iterator[tuple[slice, dict]]:
        """Yield (rows, fp64 per-row results) chunk by chunk; afterwards self._shared holds the
        fp64 gradients of the shared inputs. The first pass also measures the base's error."""
        with_base = self._base_err is None
        base_err = dict.fromkeys((*self.output_names, *self.grad_names), 0.0)
        shared64 = self._leaves(self.shared_inputs, None, torch.float64)
        shared_b = {}
        if with_base:  # fp32 leaves: their gradients sum over chunks before one rounding
            shared_b = {k: self._leaves({k: v}, None, _compute_dtype(v.dtype))[k]
                        for k, v in self.shared_inputs.items()}
        n = self.targets.shape[0]
        for r0 in range(0, n, self.chunk_rows):
            rows = slice(r0, min(n, r0 + self.chunk_rows))
            ref = self._eval(rows, torch.float64, shared64, base=False)
            if with_base:
                base = self._eval(rows, self._base_dtype, shared_b, base=True)
                for k, b in base.items():
                    base_err[k] = max(base_err[k], rule_error(b, ref[k], ref[k])[0])
                del base
            yield rows, ref
        self._shared = {f"d{k}": leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
                        for k, leaf in shared64.items()} if self.with_grad else {}
        if with_base:
            for k, leaf in shared_b.items() if self.with_grad else ():
                b = leaf.grad.to(self.shared_inputs[k].dtype)
                r = self._shared[f"d{k}"]
                for blk in _blocks(r):
                    base_err[f"d{k}"] = max(base_err[f"d{k}"],
                                            rule_error(b[blk], r[blk], r[blk])[0])
            self._base_err = base_err

    # -- the check -------------------------------------------------------------------------

    def check(self, outputs: tuple, grads: tuple = ()) -> list[TensorCheck]:
        """Compare one provider: ``outputs`` in the order of output_names (None where not
        produced), ``grads`` in the order of grad_names (its inputs' .grad)."""
        got, why = {}, {}
        outputs, grads = tuple(outputs), tuple(grads)
        given = {k: outputs[i] if i < len(outputs) else None
                 for i, k in enumerate(self.output_names)}
        given.update({k: grads[i] if i < len(grads) else None
                      for i, k in enumerate(self.grad_names)})
        for name, shape in self.shapes.items():
            if name not in given:
                continue  # a gradient not checked in this mode
            t = given[name]
            if t is None and name in self.optional_outputs:
                why[name] = "not returned"
            elif not isinstance(t, torch.Tensor):
                why[name] = "missing"
            elif tuple(t.shape) != shape:
                why[name] = f"shape {tuple(t.shape)} != {shape}"
            else:
                got[name] = t.detach()
        worst = {k: _Worst() for k in (*self.output_names, *self.grad_names)}
        chunks = self._cache if self._cache is not None else self._pass()
        keep = [] if self._cache is None and self._cacheable else None
        for rows, ref in chunks:
            for name, r in ref.items():
                out = got.get(name)
                worst[name].add(None if out is None else out[rows], r, self.reduction[name])
            if keep is not None:
                keep.append((rows, ref))
        if keep is not None:
            self._cache = keep
        for name, r in self._shared.items():
            out = got.get(name)
            for blk in _blocks(r):
                worst[name].add(None if out is None else out[blk], r[blk], self.reduction[name])
        results = []
        for name, w in worst.items():
            if why.get(name) == "not returned":
                continue
            base_err = self._base_err[name]
            err = math.inf if name in why else w.err
            results.append(TensorCheck(name, err, 2 * base_err + w.floor, base_err, w.ref_max,
                                       why.get(name, "")))
        return results


class WholeReference:
    """The rule on each output of a problem small enough to hold whole (GAE's (B, T)): ref =
    ``spec`` on fp64 copies of the floating inputs, base = ``spec`` on the inputs as given
    (fp32 math), ``reduction`` terms summed into each output element."""

    def __init__(self, spec: Callable, args: tuple, kwargs: dict, output_names: tuple,
                 reduction: int):
        def fp64(x):
            return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x

        self.ref = tuple(spec(*map(fp64, args), **{k: fp64(v) for k, v in kwargs.items()}))
        self.base = tuple(spec(*args, **kwargs))
        self.names, self.reduction = tuple(output_names), reduction

    def release(self) -> None:
        """Nothing to drop: the results are the size of the outputs."""

    def check(self, outputs: tuple, grads: tuple = ()) -> list[TensorCheck]:
        results = []
        for i, (name, ref, base) in enumerate(zip(self.names, self.ref, self.base,
                                                  strict=True)):
            out = outputs[i] if i < len(outputs) else None
            ref_max = ref.abs().max().item() if ref.numel() else 0.0
            if not isinstance(out, torch.Tensor) or out.shape != ref.shape:
                why = "missing" if not isinstance(out, torch.Tensor) else "shape"
                results.append(TensorCheck(name, math.inf, 0.0, 0.0, ref_max, why))
                continue
            err, bound, base_err = rule_error(out, ref, base, self.reduction)
            results.append(TensorCheck(name, err, bound, base_err, ref_max))
        return results


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def logprobs_from_logits_reference(logits: torch.Tensor, targets: torch.Tensor, *,
                                   upstream: dict | None = None, with_entropy: bool = False,
                                   temperature: float = 1.0, ignore_index: int = -100,
                                   **chunking) -> ChunkedReference:
    """Gate for logprobs_from_logits on (N, V) logits: log-probs (and entropy), and dlogits
    when ``upstream`` ({"logprobs": g, "entropy": g or None}) is given. ``chunking``:
    chunk_rows, cache_bytes of :class:`ChunkedReference`."""

    def spec(logits, targets):
        out = logprobs_from_logits_ref(logits, targets, temperature=temperature,
                                       ignore_index=ignore_index, return_entropy=with_entropy)
        return tuple(out) if with_entropy else (out,)

    names = ("logprobs", "entropy") if with_entropy else ("logprobs",)
    return ChunkedReference(spec, {"logits": logits}, {}, targets, upstream, names,
                            logits.shape[-1], **chunking)


def linear_logprobs_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              *, upstream: dict | None = None, with_entropy: bool = False,
                              temperature: float = 1.0, ignore_index: int = -100,
                              **chunking) -> ChunkedReference:
    """Gate for linear_logprobs on hidden (N, H) and weight (V, H): log-probs (and entropy),
    and dhidden, dweight when ``upstream`` is given."""

    half = None if hidden.dtype in (torch.float32, torch.float64) else hidden.dtype

    def spec(hidden, weight, targets):
        # the base (fp32 leaves of half inputs) rounds the d-logits as the contract does
        rounding = half if hidden.dtype == torch.float32 else None
        out = linear_logprobs_ref(hidden, weight, targets, temperature=temperature,
                                  ignore_index=ignore_index, return_entropy=with_entropy,
                                  dlogits_dtype=rounding)
        return (out.logprobs, out.entropy) if with_entropy else (out,)

    names = ("logprobs", "entropy") if with_entropy else ("logprobs",)
    return ChunkedReference(spec, {"hidden": hidden}, {"weight": weight}, targets, upstream,
                            names, weight.shape[0], **chunking)


def linear_divergence_reference(hidden: torch.Tensor, weight: torch.Tensor,
                                teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor,
                                targets: torch.Tensor, *, kind: str = "jsd", beta: float = 0.5,
                                upstream: dict | None = None, temperature: float = 1.0,
                                ignore_index: int = -100, **chunking) -> ChunkedReference:
    """Gate for linear_divergence (and the distillation losses built on it) on a student
    (hidden, weight) and a frozen teacher: the per-token divergence (which providers that
    return a reduced loss only may leave out), and dhidden, dweight when ``upstream``
    ({"divergence": g}) is given."""
    teacher_weight = teacher_weight.detach()
    cast = {}  # the teacher weight in each dtype the spec runs in, converted once

    def spec(hidden, teacher_hidden, weight, targets):
        if hidden.dtype not in cast:
            cast[hidden.dtype] = teacher_weight.to(hidden.dtype)
        return (linear_divergence_ref(hidden, weight, teacher_hidden, cast[hidden.dtype],
                                      targets, kind=kind,
                                      beta=beta, temperature=temperature,
                                      ignore_index=ignore_index),)

    return ChunkedReference(spec, {"hidden": hidden}, {"weight": weight}, targets, upstream,
                            ("divergence",), weight.shape[0], frozen_rows={
                                "teacher_hidden": teacher_hidden},
                            optional_outputs=("divergence",), **chunking)
