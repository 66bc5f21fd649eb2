"""Suite: per-token log-probs of the target tokens from materialized logits (N, V).

Providers, all on the same peaked logits (:func:`prefkern.bench.inputs.peaked_problem` with
H=256: the logit distribution does not depend on H, see there) and the same targets, IGNORE_FRAC
of them ignored (-100: 0 log-prob and 0 gradient in every provider):
  torch_eager          ``torch.log_softmax(logits.float(), -1).gather(-1, t[:, None])``, masked
                       where t == -100 (what trainers write; the baseline)
  torch_compile        the same under ``torch.compile`` (CUDA only; compiled in the first,
                       untimed call)
  prefkern_<backend>   ``prefkern.logprobs_from_logits(..., backend=b)`` for every backend
                       usable on the device (CPU: torch only, Triton would be its interpreter)
  flashattn_triton_ce  ``-flash_attn.ops.triton.cross_entropy.cross_entropy_loss(x, t,
                       ignore_index=-100)[0]``
  trl_selective_log_softmax  TRL 1.16's ``selective_log_softmax`` (and ``entropy_from_logits``
                       in the +entropy rows), when trl is installed
  liger_ce_none        ``-liger_cross_entropy(x, t, ignore_index=-100, reduction="none")``
                       (losses in the logits' dtype; its forward writes the gradient into its
                       own copy of the logits, so after the first, checked call it is timed on
                       overwritten values)
  copy                 ``dst.copy_(logits)``: the device's bandwidth on the same bytes
Modes: "fwd" under torch.no_grad; "fwd+bwd" with a random upstream gradient on the log-probs
(and on the entropy in the +entropy rows, whose providers also return it).
Check: the log-probs (and in fwd+bwd dlogits), every element, against the fp64 spec
logprobs_from_logits_ref in row chunks (prefkern/bench/reference_check.py).

Bytes counted for GB/s (e = bytes per logit; small per-token terms included):
  fwd      N*V*e (logits read once) + 8N (int64 targets) + 4N (fp32 log-probs written)
  fwd+bwd  3*N*V*e (logits read by the forward and the backward, gradient written once)
           + 20N (targets read twice, log-probs written, upstream gradient read)
  copy     2*N*V*e (read + write)
"""

from __future__ import annotations

import torch

import prefkern
from prefkern.bench.core import Case, Problem, Suite
from prefkern.bench.inputs import IGNORE_INDEX, ignored_fraction, logit_stats, peaked_problem
from prefkern.bench.reference_check import logprobs_from_logits_reference
from prefkern.bench.suites import register

# (N, V) per preset; CUDA runs bf16, CPU runs bf16 and fp32
SHAPES = {
    "default": [(8192, 128256), (4096, 32000)],
    "small": [(256, 32000)],
    "tiny": [(64, 1000)],
}
H_FOR_LOGITS = 256
IGNORE_FRAC = 0.1  # targets set to -100 (prompt / padding tokens)


def bytes_moved(n: int, v: int, elt: int, mode: str) -> int:
    return 3 * n * v * elt + 20 * n if mode == "fwd+bwd" else n * v * elt + 12 * n


def _eager(targets, with_entropy: bool = False):
    def logp(x):
        valid = targets != IGNORE_INDEX
        log_p = torch.log_softmax(x.float(), -1)
        logp = log_p.gather(-1, targets.clamp_min(0)[:, None])[:, 0].masked_fill(~valid, 0.0)
        if not with_entropy:
            return logp
        return logp, (-(log_p.exp() * log_p).sum(-1)).masked_fill(~valid, 0.0)

    return logp


def _prefkern(targets, backend, with_entropy: bool = False):
    def logp(x):
        out = prefkern.logprobs_from_logits(x, targets, ignore_index=IGNORE_INDEX,
                                            return_entropy=with_entropy, backend=backend)
        return (out.logprobs, out.entropy) if with_entropy else out

    return logp


def _trl(targets, with_entropy: bool = False):
    """TRL's own helpers (trl.trainer.utils, 1.16): selective_log_softmax (fp32 logits:
    logsumexp + gather; half logits: a row loop over log_softmax in the logits' dtype) and
    entropy_from_logits (chunks of 128 rows). TRL scores every token and masks after."""
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    valid = targets != IGNORE_INDEX
    ids = targets.clamp_min(0)

    def logp(x):
        out = selective_log_softmax(x, ids).float().masked_fill(~valid, 0.0)
        if not with_entropy:
            return out
        return out, entropy_from_logits(x).float().masked_fill(~valid, 0.0)

    return logp


def _peers(targets) -> tuple[dict, dict]:
    """Peer log-prob functions x -> logp (= -per-token loss); missing ones with the reason."""
    peers, skipped = {}, {}
    try:
        from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

        peers["flashattn_triton_ce"] = lambda x: -cross_entropy_loss(
            x, targets, ignore_index=IGNORE_INDEX)[0]
    except ImportError as err:
        skipped["flashattn_triton_ce"] = f"not installed ({err.name})"
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy

        peers["liger_ce_none"] = lambda x: -liger_cross_entropy(
            x, targets, ignore_index=IGNORE_INDEX, reduction="none")
    except ImportError as err:
        skipped["liger_ce_none"] = f"not installed ({err.name})"
    return peers, skipped


def providers(targets, device: torch.device, with_entropy: bool = False
              ) -> tuple[dict, dict]:
    """-> ({name: logits -> logp, or (logp, entropy) with_entropy}, {name: why skipped})."""
    eager = _eager(targets, with_entropy)
    funcs, skipped = {"torch_eager": eager}, {}
    if device.type == "cuda":
        funcs["torch_compile"] = torch.compile(eager, dynamic=False)
    else:
        skipped["torch_compile"] = "CUDA only"
    usable = [b for b, why in prefkern.available_backends(device).items() if why is None]
    if device.type != "cuda":
        usable = [b for b in usable if b == "torch"]  # the Triton interpreter is a test vehicle
    funcs.update({f"prefkern_{b}": _prefkern(targets, b, with_entropy) for b in usable})
    try:
        funcs["trl_selective_log_softmax"] = _trl(targets, with_entropy)
    except ImportError as err:
        skipped["trl_selective_log_softmax"] = f"not installed ({err.name})"
    if with_entropy:
        skipped["flash-attn, Liger"] = "return no entropy"
    elif device.type == "cuda":
        peers, why = _peers(targets)
        funcs.update(peers)
        skipped.update(why)
    else:
        skipped["flash-attn, Liger"] = "run on CUDA only"
    return funcs, skipped


def _step(name: str, fn, logits: torch.Tensor, g: torch.Tensor, mode: str):
    """-> (the callable to time, the tensor it differentiates). The callable returns
    (log-probs, None): the per-token outputs the runner checks (with the logits' gradient)."""
    def per_token(out):
        return out if isinstance(out, tuple) else (out, None)

    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return per_token(fn(logits))

        return fwd, logits
    # Liger overwrites the logits it is given with their gradient: it gets its own copy
    x = logits.detach().clone() if name.startswith("liger") else logits.detach()
    x.requires_grad_(True)

    def fwd_bwd():
        logp, entropy = per_token(fn(x))
        loss = (logp * g).sum() + (0.0 if entropy is None else (entropy * g_ent).sum())
        loss.backward()
        return logp.detach(), None if entropy is None else entropy.detach()

    g_ent = g.flip(0)  # the entropy's upstream gradient (when there is one)
    return fwd_bwd, x


def _copy(dst: torch.Tensor, src: torch.Tensor):
    def copy():
        dst.copy_(src)  # returns None: nothing to compare

    return copy


def problems(device: torch.device, shapes: str):
    preset = shapes if device.type == "cuda" or shapes != "default" else "small"
    dtypes = [torch.bfloat16] if device.type == "cuda" else [torch.bfloat16, torch.float32]
    for n, v in SHAPES[preset]:
        hidden, weight, targets = peaked_problem(n, H_FOR_LOGITS, v, torch.float32, device,
                                                 ignore_frac=IGNORE_FRAC)
        info = {"input": f"N={n} V={v} peaked (H={H_FOR_LOGITS})",
                "ignored_frac": ignored_fraction(targets), **logit_stats(hidden, weight)}
        logits32 = hidden @ weight.T
        del hidden, weight
        g = torch.randn(n, device=device, generator=torch.Generator(device).manual_seed(1))
        for i, dtype in enumerate(dtypes):
            logits = logits32.to(dtype)
            if i == len(dtypes) - 1:
                logits32 = None  # free it before timing
            elt = logits.element_size()
            dst = torch.empty_like(logits)
            for mode in ("fwd", "fwd+bwd"):
                for with_entropy in (False, True):
                    funcs, skipped = providers(targets, device, with_entropy)
                    cases = []
                    for name, fn in funcs.items():
                        step, x = _step(name, fn, logits, g, mode)
                        grads = (x,) if x.requires_grad else ()
                        cases.append(Case(name, step, bytes_moved(n, v, elt, mode), "GB/s",
                                          grads))
                    cases.append(Case("copy", _copy(dst, logits), 2 * n * v * elt, "GB/s"))
                    upstream = None if mode == "fwd" else \
                        {"logprobs": g, "entropy": g.flip(0) if with_entropy else None}
                    reference = logprobs_from_logits_reference(
                        logits, targets, upstream=upstream, with_entropy=with_entropy)
                    label = f"N={n} V={v}" + (" +entropy" if with_entropy else "")
                    yield Problem(label, mode, str(dtype).removeprefix("torch."), cases,
                                  "torch_eager", dict(skipped), info, reference)
            del logits, dst


register(Suite("logprobs_from_logits", problems,
               "log-probs of targets from existing logits (bandwidth bound, GB/s)"))
