"""Suite: per-token log-probs from materialized logits (N, V).

Bytes counted: fwd reads the logits once (+ 12 B/row out); fwd+bwd reads them twice and writes
the gradient once. The copy row moves the same bytes as a read + write of the logits, so
throughput / copy throughput is the fraction of achievable bandwidth.
"""

from __future__ import annotations

import torch

import prefkern
from prefkern.bench.core import Case, Problem, Suite
from prefkern.bench.inputs import logit_stats, peaked_problem
from prefkern.bench.suites import register

SHAPES = {
    "default": [(8192, 128256), (4096, 32000)],
    "small": [(512, 32000)],
    "tiny": [(64, 1000)],
}


def _peers(logits, targets):
    """Peer log-prob functions (fwd); each returns -loss = logp. Missing peers are skipped."""
    peers, skipped = {}, {}
    try:
        from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

        peers["flashattn_triton_ce"] = lambda x: -cross_entropy_loss(x, targets)[0]
    except ImportError as err:
        skipped["flashattn_triton_ce"] = f"not installed ({err.name})"
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy

        def liger(x):
            out = liger_cross_entropy(x, targets, reduction="none")
            return -(out[0] if isinstance(out, tuple) else out)

        peers["liger_ce_none"] = liger
    except ImportError as err:
        skipped["liger_ce_none"] = f"not installed ({err.name})"
    return peers, skipped


def _own_funcs(targets, backends):
    """Eager torch (what trainers write) and prefkern's backends: logits -> logp."""
    def eager(x):
        return torch.log_softmax(x.float(), -1).gather(-1, targets[:, None])[:, 0]

    def backend_fn(backend):
        return lambda x: prefkern.logprobs_from_logits(x, targets, backend=backend)

    return {"torch_eager": eager, **{f"prefkern_{b}": backend_fn(b) for b in backends}}


def _copy(dst, src):
    def copy():
        dst.copy_(src)  # returns None: nothing to compare

    return copy


def problems(device: torch.device, shapes: str):
    dtype = torch.bfloat16
    preset = shapes if device.type == "cuda" or shapes != "default" else "small"
    for n, v in SHAPES[preset]:
        hidden, weight, targets = peaked_problem(n, 256, v, torch.float32, device)
        logits = (hidden @ weight.T).to(dtype)
        info = {"input": f"N={n} V={v} peaked (H=256)", **logit_stats(hidden, weight)}
        del hidden, weight
        elt = logits.element_size()
        backends = [b for b, why in prefkern.available_backends(device).items() if why is None]
        if device.type != "cuda":
            backends = ["torch"]  # the Triton interpreter is a test vehicle, not a contender
        peers, skipped = _peers(logits, targets) if device.type == "cuda" else ({}, {
            "peers": "flash-attn / Liger need a CUDA device"})
        for mode in ("fwd", "fwd+bwd"):
            work = n * v * elt * (1 if mode == "fwd" else 3) + 12 * n
            leaf = logits.detach().requires_grad_(mode != "fwd")
            g = torch.randn(n, device=device)
            funcs = {**_own_funcs(targets, backends), **peers}
            cases = []
            for name, fn in funcs.items():
                step, x = _step(fn, leaf, g, mode, own_copy=name.startswith("liger"))
                cases.append(Case(name, step, work, "GB/s", (x,)))
            dst = torch.empty_like(logits)
            cases.append(Case("copy", _copy(dst, logits), 2 * n * v * elt, "GB/s"))
            yield Problem(f"N={n} V={v}", mode, "bf16", cases, "torch_eager", dict(skipped), info)


def _step(fn, leaf, g, mode, own_copy=False):
    """-> (the callable to time, the logits tensor it differentiates).
    Liger's CE writes its gradient into the logits in place: it gets its own copy."""
    x = leaf.detach().clone().requires_grad_(leaf.requires_grad) if own_copy else leaf
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return fn(x)

        return fwd, x

    def fwd_bwd():
        loss = (fn(x) * g).sum()
        loss.backward()
        return loss

    return fwd_bwd, x


register(Suite("logprobs_from_logits", problems,
               "log-probs of targets from existing logits (bandwidth bound)"))
