"""Suite: full-vocabulary divergence between a student and a frozen teacher (distillation, exact
KL penalties), from hidden states and LM heads: the generalized JSD at beta 0 (= forward KL) and
0.5, as TRL GKD and Liger define it.

Input: the peaked student head of prefkern/bench/inputs.py and a teacher built the same way from
another seed (a different model on the same tokens). Loss: the batchmean of the per-token
divergence over valid tokens (upstream gradient 1 / n_valid on each), TRL GKD's reduction.
Providers:
  torch_eager              both (N, V) logits in fp32, log_softmax, the JSD formula
  liger_fused_linear_jsd   Liger-Kernel's LigerFusedLinearJSD (a scalar loss: its gradients
                           are checked, not per-token values)
  prefkern_fast            prefkern.linear_divergence, Triton backend (6 GEMMs fwd+bwd:
                           forward, then a recomputing backward for any upstream gradient;
                           what linear_distill_loss runs when dw_budget_bytes is below its
                           fp32 (V, H) accumulator: no accumulator)
  prefkern_min_memory      the same op in mode="min_memory" (GPU): fused Triton tiles of both
                           heads, no logits buffer; forward one pass over both heads at
                           beta 0 (forward KL), two at beta 0.5; backward recomputes both
                           heads' tiles in its dh and its dW pass (8 GEMMs' FLOPs in all at
                           beta 0, 10 at beta 0.5, against the floor's 4)
  prefkern_distill_fused   prefkern.losses.linear_distill_loss: the gradient in the forward
                           pass, 4 GEMMs (scalar loss)
  floor_4gemm              cuBLAS: both logits GEMMs, dh and dW (the FLOPs of the fused loss)
FLOPs counted: fwd 4NHV (two logits GEMMs); fwd+bwd 8NHV (+ dh, dW).
Check: per-token divergence and dhidden, dweight against the fp64 spec
(prefkern/bench/reference_check.py linear_divergence_reference).
"""

from __future__ import annotations

import math

import torch

import prefkern
from prefkern.bench.core import Case, Problem, Suite, add_peer
from prefkern.bench.inputs import IGNORE_INDEX, ignored_fraction, logit_stats, peaked_problem
from prefkern.bench.reference_check import linear_divergence_reference
from prefkern.bench.suites import register

SHAPES = {
    "default": [(8192, 4096, 128256)],
    "small": [(256, 256, 16000)],
    "tiny": [(64, 64, 1000)],
}
IGNORE_FRAC = 0.1
BETAS = (0.0, 0.5)


def _eager(hidden, weight, t_hidden, t_weight, targets, beta):
    def step():
        a = (hidden @ weight.T).float().log_softmax(-1)
        with torch.no_grad():
            b = (t_hidden @ t_weight.T).float().log_softmax(-1)
        if beta == 0.0:
            per_token = (b.exp() * (b - a)).sum(-1)
        else:
            m = torch.logaddexp(a + math.log1p(-beta), b + math.log(beta))
            per_token = beta * (b.exp() * (b - m)).sum(-1) + \
                (1 - beta) * (a.exp() * (a - m)).sum(-1)
        return per_token.masked_fill(targets == IGNORE_INDEX, 0.0), None

    return step


def _prefkern(hidden, weight, t_hidden, t_weight, targets, beta, backend, mode="auto"):
    def step():
        return prefkern.linear_divergence(hidden, weight, t_hidden, t_weight, targets,
                                          kind="jsd", beta=beta, backend=backend,
                                          mode=mode), None

    return step


def _fused(hidden, weight, t_hidden, t_weight, targets, beta, backend):
    def step():
        loss, _ = prefkern.losses.linear_distill_loss(hidden, weight, t_hidden, t_weight,
                                                      targets, kind="jsd", beta=beta,
                                                      backend=backend)
        return None, loss

    return step


def _liger(hidden, weight, t_hidden, t_weight, targets, beta):
    from liger_kernel.transformers import LigerFusedLinearJSD

    module = LigerFusedLinearJSD(jsd_beta=beta, ignore_index=IGNORE_INDEX)

    def step():
        # Liger's beta weighs the teacher P as ours weighs q: M = beta P + (1 - beta) Q
        return None, module(hidden, weight, t_hidden, t_weight, targets)

    return step


def _floor(hidden, weight, t_hidden, t_weight, mode):
    def step():
        z = hidden @ weight.T
        t_hidden @ t_weight.T
        if mode != "fwd":
            z @ weight, z.T @ hidden

    return step


def _as_step(fn, mode: str, g_div: torch.Tensor, checked: bool):
    """fwd: under no_grad, the per-token values; fwd+bwd: backward of sum(D * g_div) (per-token
    providers) or of the returned batchmean loss; returns (per-token D or None,) detached."""
    def step():
        with torch.set_grad_enabled(mode != "fwd"):
            per_token, loss = fn()
            if mode != "fwd":
                (loss if per_token is None else (per_token * g_div).sum()).backward()
        return (None if per_token is None else per_token.detach(),) if checked else None

    return step


def problems(device: torch.device, shapes: str):
    preset = shapes if device.type == "cuda" or shapes != "default" else "small"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for n, h, v in SHAPES[preset]:
        hidden, weight, targets = peaked_problem(n, h, v, dtype, device, ignore_frac=IGNORE_FRAC)
        t_hidden, t_weight, _ = peaked_problem(n, h, v, dtype, device, seed=1)
        valid = targets != IGNORE_INDEX
        g_div = valid.float() / valid.sum().clamp(min=1)  # the batchmean's gradient
        info = {"input": f"N={n} H={h} V={v} peaked student, peaked teacher",
                "ignored_frac": ignored_fraction(targets), **logit_stats(hidden, weight)}
        for beta in BETAS:
            for mode in ("fwd", "fwd+bwd"):
                grad = mode != "fwd"
                hid = hidden.detach().requires_grad_(grad)
                wt = weight.detach().requires_grad_(grad)
                args = (hid, wt, t_hidden, t_weight)
                backend = "triton" if device.type == "cuda" else "torch"
                steps = {"torch_eager": _eager(*args, targets, beta),
                         f"prefkern_{'fast' if backend == 'triton' else 'torch'}":
                             _prefkern(*args, targets, beta, backend)}
                skipped = {}
                if grad:
                    steps["prefkern_distill_fused"] = _fused(*args, targets, beta, backend)
                if device.type == "cuda":
                    steps["prefkern_min_memory"] = _prefkern(*args, targets, beta, backend,
                                                             "min_memory")
                    steps[f"floor_{'2' if mode == 'fwd' else '4'}gemm"] = _floor(*args, mode)
                if grad or device.type != "cuda":  # Liger's JSD has no forward-only call
                    add_peer(steps, skipped, "liger_fused_linear_jsd",
                             lambda a=(*args, targets, beta): _liger(*a), device)
                work = 2.0 * n * h * v * (2 if mode == "fwd" else 4)
                cases = [Case(name, _as_step(fn, mode, g_div, not name.startswith("floor")),
                              work, "TFLOP/s", (hid, wt) if grad else ())
                         for name, fn in steps.items()]
                reference = linear_divergence_reference(
                    hid, wt, t_hidden, t_weight, targets, kind="jsd", beta=beta,
                    upstream={"divergence": g_div} if grad else None)
                yield Problem(f"N={n} H={h} V={v} jsd beta={beta}", mode,
                              str(dtype).removeprefix("torch."), cases, "torch_eager",
                              skipped, info, reference)
        del hidden, weight, t_hidden, t_weight


register(Suite("divergence", problems,
               "full-vocabulary JSD / forward KL between a student and a teacher head"))
