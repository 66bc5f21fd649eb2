"""What the linear log-prob benchmark times: per-token log-probs (optionally entropy) of target
tokens from hidden (N, H) and an LM head (V, H), by prefkern and by its peers, on one input.

Every provider is a zero-argument closure doing one step:
  fwd       under torch.no_grad (reference / old-policy log-probs);
  fwd+bwd   with a random upstream gradient on the log-probs (and on the entropy when asked),
            gradients to hidden and weight.
FLOPs counted (DESIGN.md): fwd 2NHV; fwd+bwd 2NHV + 4NHV (+ 2NHV where logits are recomputed).
The matmul floors are plain cuBLAS GEMMs doing the same FLOPs: 1 GEMM (fwd), 3 GEMMs (fwd+bwd
without recompute), 4 GEMMs (with recompute).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import prefkern

Provider = Callable[[], object]


def flops(n: int, h: int, v: int, mode: str) -> float:
    """Useful FLOPs of the op (no recompute counted): the TFLOP/s column is comparable."""
    return 2.0 * n * h * v * (1 if mode == "fwd" else 3)


def _eager(hidden, weight, targets, g_logp, g_ent, with_entropy):
    def step():
        logits = (hidden @ weight.T).float()
        log_p = logits.log_softmax(-1)
        logp = log_p.gather(-1, targets.clamp_min(0)[:, None])[:, 0]
        loss = (logp * g_logp).sum()
        if with_entropy:
            loss = loss - ((log_p.exp() * log_p).sum(-1) * g_ent).sum()
        return loss

    return step


def _floor(hidden, weight, n_gemms: int):
    def step():
        logits = hidden @ weight.T
        if n_gemms == 1:
            return logits
        if n_gemms == 4:
            logits = hidden @ weight.T  # the recompute of a fused backward
        return logits @ weight, logits.T @ hidden

    return step


def _prefkern(hidden, weight, targets, g_logp, g_ent, with_entropy, backend, mode):
    def step():
        out = prefkern.linear_logprobs(hidden, weight, targets, return_entropy=with_entropy,
                                       mode=mode, backend=backend)
        if not with_entropy:
            return (out * g_logp).sum()
        return (out.logprobs * g_logp).sum() + (out.entropy * g_ent).sum()

    return step


def _peer_liger(hidden, weight, targets, g_logp):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    def step():
        loss = liger_fused_linear_cross_entropy(hidden, weight, targets, reduction="none")
        loss = loss[0] if isinstance(loss, tuple) else loss
        return (-loss * g_logp).sum()  # loss = -logp

    return step


def _peer_cce(hidden, weight, targets, g_logp, exact: bool):
    from cut_cross_entropy import linear_cross_entropy

    kw = {"filter_eps": None} if exact else {}

    def step():
        loss = linear_cross_entropy(hidden, weight, targets, reduction="none", **kw)
        return (-loss * g_logp).sum()

    return step


def _peer_torch_linear_ce(hidden, weight, targets, g_logp):
    linear_ce = torch.nn.functional.linear_cross_entropy

    def step():
        loss = linear_ce(hidden, weight, targets, reduction="none", ignore_index=-100)
        return (-loss * g_logp).sum()

    return step


def providers(hidden, weight, targets, mode: str, with_entropy: bool) -> tuple[dict, dict]:
    """-> ({name: step}, {name: why skipped}) for one input. Names of approximate methods end
    in '(approx)'."""
    device = hidden.device
    n = hidden.shape[0]
    g_logp = torch.randn(n, device=device)
    g_ent = torch.randn(n, device=device)
    steps: dict[str, Provider] = {}
    skipped: dict[str, str] = {}
    steps["torch_eager"] = _eager(hidden, weight, targets, g_logp, g_ent, with_entropy)
    if device.type == "cuda":
        if mode == "fwd":
            steps["floor_1gemm"] = _floor(hidden, weight, 1)
        else:
            steps["floor_3gemm"] = _floor(hidden, weight, 3)
            steps["floor_4gemm"] = _floor(hidden, weight, 4)
        for pk_mode in ("fast", "min_memory"):
            steps[f"prefkern_{pk_mode}"] = _prefkern(hidden, weight, targets, g_logp, g_ent,
                                                     with_entropy, "triton", pk_mode)
    else:
        steps["prefkern_torch"] = _prefkern(hidden, weight, targets, g_logp, g_ent, with_entropy,
                                            "torch", "auto")
    if with_entropy:
        skipped["peers"] = "Liger-Kernel and Cut Cross-Entropy return no entropy"
        return steps, skipped
    peers = {
        "liger_flce_none": lambda: _peer_liger(hidden, weight, targets, g_logp),
        "cce_exact": lambda: _peer_cce(hidden, weight, targets, g_logp, exact=True),
        "cce_default (approx)": lambda: _peer_cce(hidden, weight, targets, g_logp, exact=False),
    }
    if hasattr(torch.nn.functional, "linear_cross_entropy"):
        peers["torch_linear_cross_entropy"] = lambda: _peer_torch_linear_ce(
            hidden, weight, targets, g_logp)
    for name, make in peers.items():
        if device.type != "cuda" and not name.startswith("torch_"):
            skipped[name] = "needs a CUDA device"
            continue
        try:
            steps[name] = make()
        except ImportError as err:
            skipped[name] = f"not installed ({err.name})"
    return steps, skipped


def as_step(name: str, fn: Provider, mode: str) -> Provider:
    """The callable to time: floors and fwd mode run under no_grad; fwd+bwd steps backpropagate
    their scalar (the timer resets .grad of the inputs between calls)."""
    if mode == "fwd" or name.startswith("floor_"):
        def no_grad_step():
            with torch.no_grad():
                out = fn()
            return None if name.startswith("floor_") else out  # floors compute no log-probs

        return no_grad_step

    def train_step():
        loss = fn()
        loss.backward()
        return loss

    return train_step
