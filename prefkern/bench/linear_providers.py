"""What the linear log-prob benchmark times: per-token log-probs (optionally entropy) of target
tokens from hidden (N, H) and an LM head (V, H), by prefkern and by its peers, on one input.

Every provider is a zero-argument closure returning the per-token (logp, entropy or None) with
their graph; :func:`as_step` makes the step that is checked and timed:
  fwd       under torch.no_grad (reference / old-policy log-probs);
  fwd+bwd   backward of ``sum(logp * g_logp) + sum(entropy * g_ent)`` (random upstream
            gradients, the entropy term when asked), gradients to hidden and weight.
The step returns (logp, entropy or None), detached, and leaves the gradients in .grad: the
runner checks them against prefkern.bench.reference_check. Ignored targets (-100) give 0
log-prob and 0 gradient in every provider (eager masks them; the peers take ignore_index).
FLOPs counted: fwd 2NHV; fwd+bwd 2NHV + 4NHV (+ 2NHV where logits are recomputed).
The matmul floors are plain GEMMs (cuBLAS, or the CPU's BLAS) doing the same FLOPs: 1 GEMM
(fwd), 3 GEMMs (fwd+bwd without recompute), 4 GEMMs (with recompute). On CPU they are timed
too, and for half inputs also with the logit GEMMs in fp32 (``floor_fp32_logits_*``): torch has
no half GEMM with fp32 output on CPU, so that is the floor of any path that keeps the numerics
contract there (logits never rounded to the input dtype), eager's bf16 GEMMs round them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import prefkern
from prefkern.bench.core import add_peer
from prefkern.bench.inputs import IGNORE_INDEX

Provider = Callable[[], object]


def flops(n: int, h: int, v: int, mode: str) -> float:
    """Useful FLOPs of the op (no recompute counted): the TFLOP/s column is comparable."""
    return 2.0 * n * h * v * (1 if mode == "fwd" else 3)


def _eager(hidden, weight, targets, with_entropy):
    def step():
        logits = (hidden @ weight.T).float()
        log_p = logits.log_softmax(-1)
        valid = targets != IGNORE_INDEX
        logp = log_p.gather(-1, targets.clamp_min(0)[:, None])[:, 0].masked_fill(~valid, 0.0)
        if not with_entropy:
            return logp, None
        return logp, (-(log_p.exp() * log_p).sum(-1)).masked_fill(~valid, 0.0)

    return step


def _floor(hidden, weight, n_gemms: int, fp32_logits: bool = False):
    """``n_gemms`` GEMMs of the head's shapes; ``fp32_logits``: the logit GEMMs on fp32 copies
    of the inputs (the copies timed too), the gradient GEMMs in the input dtype."""
    def step():
        h, w = (hidden.float(), weight.float()) if fp32_logits else (hidden, weight)
        logits = h @ w.T
        if n_gemms == 1:
            return logits
        if n_gemms == 4:
            logits = h @ w.T  # the recompute of a fused backward
        dz = logits.to(hidden.dtype)
        return dz @ weight, dz.T @ hidden

    return step


def _prefkern(hidden, weight, targets, with_entropy, backend, mode):
    def step():
        out = prefkern.linear_logprobs(hidden, weight, targets, return_entropy=with_entropy,
                                       ignore_index=IGNORE_INDEX, mode=mode, backend=backend)
        return (out.logprobs, out.entropy) if with_entropy else (out, None)

    return step


def _peer_liger(hidden, weight, targets):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    def step():
        loss = liger_fused_linear_cross_entropy(hidden, weight, targets,
                                                ignore_index=IGNORE_INDEX, reduction="none")
        loss = loss[0] if isinstance(loss, tuple) else loss
        return -loss, None  # loss = -logp, 0 at ignored tokens

    return step


def _peer_cce(hidden, weight, targets, exact: bool):
    from cut_cross_entropy import linear_cross_entropy

    kw = {"filter_eps": None} if exact else {}

    def step():
        loss = linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE_INDEX,
                                    reduction="none", **kw)
        return -loss, None  # reduction="none" scatters 0 into ignored tokens

    return step


def _peer_torch_linear_ce(hidden, weight, targets, chunked: bool):
    """torch's F.linear_cross_entropy: the reference path (the full logits), or with
    ``options=nn.LinearCrossEntropyOptions()`` its chunked path (torch >= 2.13)."""
    linear_ce = torch.nn.functional.linear_cross_entropy
    kw = {"options": torch.nn.LinearCrossEntropyOptions()} if chunked else {}

    def step():
        loss = linear_ce(hidden, weight, targets, reduction="none", ignore_index=IGNORE_INDEX,
                         **kw)
        return -loss, None

    return step


def _peer_verl(hidden, weight, targets):
    """verl's fused kernel (verl.utils.kernel.linear_cross_entropy: log-probs and entropy from
    hidden states, Triton, CUDA only). verl scores every token and masks in the loss: ignored
    targets are scored as id 0 here and their outputs masked after."""
    from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy

    valid = targets != IGNORE_INDEX
    labels = torch.where(valid, targets, 0)

    def step():
        logp, entropy = linear_cross_entropy(hidden, weight, labels, 1.0, "none")
        return logp.masked_fill(~valid, 0.0), entropy.masked_fill(~valid, 0.0)

    return step


def _chunk_logprobs(hidden, weight, targets, with_entropy: bool):
    """Eager's math on one chunk of rows (the body that torch.compile fuses)."""
    log_p = (hidden @ weight.T).float().log_softmax(-1)
    valid = targets != IGNORE_INDEX
    logp = log_p.gather(-1, targets.clamp_min(0)[:, None])[:, 0].masked_fill(~valid, 0.0)
    if not with_entropy:
        return logp, None
    return logp, (-(log_p.exp() * log_p).sum(-1)).masked_fill(~valid, 0.0)


COMPILED_CHUNK_ROWS = 1024


def _compiled_chunked(hidden, weight, targets, with_entropy: bool):
    """What a user writes with torch.compile instead of a kernel library: a compiled chunk body
    under activation checkpointing (the chunk's logits are recomputed in the backward instead
    of kept), rows in chunks of COMPILED_CHUNK_ROWS."""
    from torch.utils.checkpoint import checkpoint

    torch.compiler.reset()  # a fresh compile for this input (no recompile limit across shapes)
    body = torch.compile(_chunk_logprobs, dynamic=False, fullgraph=True)
    step_rows = min(COMPILED_CHUNK_ROWS, hidden.shape[0])

    def step():
        parts = [checkpoint(body, hidden[r0:r0 + step_rows], weight,
                            targets[r0:r0 + step_rows], with_entropy, use_reentrant=False)
                 for r0 in range(0, hidden.shape[0], step_rows)]
        logp = torch.cat([p[0] for p in parts])
        return logp, (torch.cat([p[1] for p in parts]) if with_entropy else None)

    return step


def providers(hidden, weight, targets, mode: str, with_entropy: bool) -> tuple[dict, dict]:
    """-> ({name: provider}, {name: why skipped}) for one input. Names of approximate methods
    end in '(approx)'."""
    device = hidden.device
    steps: dict[str, Provider] = {}
    skipped: dict[str, str] = {}
    steps["torch_eager"] = _eager(hidden, weight, targets, with_entropy)
    for n_gemms in (1,) if mode == "fwd" else (3, 4):
        steps[f"floor_{n_gemms}gemm"] = _floor(hidden, weight, n_gemms)
        if device.type == "cpu" and n_gemms != 3 and hidden.dtype in (torch.float16,
                                                                      torch.bfloat16):
            steps[f"floor_fp32_logits_{n_gemms}gemm"] = _floor(hidden, weight, n_gemms, True)
    if device.type == "cuda":
        for pk_mode in ("fast", "min_memory"):
            steps[f"prefkern_{pk_mode}"] = _prefkern(hidden, weight, targets, with_entropy,
                                                     "triton", pk_mode)
    else:
        steps["prefkern_torch"] = _prefkern(hidden, weight, targets, with_entropy, "torch",
                                            "auto")
    steps["torch_compile_chunked"] = _compiled_chunked(hidden, weight, targets, with_entropy)
    add_peer(steps, skipped, "verl_linear_cross_entropy",
             lambda: _peer_verl(hidden, weight, targets), device)
    if with_entropy:
        skipped["liger, cce, torch F.linear_cross_entropy"] = "return no entropy"
        return steps, skipped
    peers = {
        "liger_flce_none": lambda: _peer_liger(hidden, weight, targets),
        "cce_exact": lambda: _peer_cce(hidden, weight, targets, exact=True),
        "cce_default (approx)": lambda: _peer_cce(hidden, weight, targets, exact=False),
    }
    if hasattr(torch.nn.functional, "linear_cross_entropy"):
        peers["torch_linear_cross_entropy"] = lambda: _peer_torch_linear_ce(
            hidden, weight, targets, chunked=False)
    if hasattr(torch.nn, "LinearCrossEntropyOptions"):
        peers["torch_linear_cross_entropy_chunked"] = lambda: _peer_torch_linear_ce(
            hidden, weight, targets, chunked=True)
    for name, make in peers.items():
        add_peer(steps, skipped, name, make, device, needs_cuda=not name.startswith("torch_"))
    return steps, skipped


def as_step(name: str, fn: Provider, mode: str, g_logp: torch.Tensor,
            g_ent: torch.Tensor | None = None) -> Provider:
    """The callable to check and time: floors and fwd mode run under no_grad; fwd+bwd steps
    backpropagate ``sum(logp * g_logp) + sum(entropy * g_ent)`` (the timer resets .grad of the
    inputs between calls). Returns (logp, entropy or None) detached; floors return None."""
    if name.startswith("floor_"):
        def floor_step():
            with torch.no_grad():
                fn()
            # floors compute no log-probs: nothing to check

        return floor_step

    if mode == "fwd":
        def no_grad_step():
            with torch.no_grad():
                return fn()

        return no_grad_step

    def train_step():
        logp, entropy = fn()
        loss = (logp * g_logp).sum()
        if entropy is not None and g_ent is not None:
            loss = loss + (entropy * g_ent).sum()
        loss.backward()
        return logp.detach(), None if entropy is None else entropy.detach()

    return train_step
