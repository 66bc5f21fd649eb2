"""Suite: DPO (sigmoid, beta 0.1) from hidden states and the LM head, the reference model's
hidden states and weight inside (its log-probs under no_grad), TRL's concatenated layout
(B chosen rows then B rejected rows, prompt tokens ignored).

Providers:
  torch_eager             TRL-style: bf16 logits of both models, fp32 log_softmax, gather,
                          masked sums, the loss
  liger_fused_linear_dpo  Liger-Kernel's LigerFusedLinearDPOLoss (reference inside)
  prefkern                prefkern.losses.linear_preference_loss (Triton on a GPU)
  floor_4gemm             cuBLAS: reference forward, policy forward, dh, dW
FLOPs counted: 8NHV (N = 2 B T tokens). Check (shapes up to N*V = 32768 * 152064, the first
GPU shape: the fp64 reference costs one fp64 pass over the logits per provider): dhidden and
dweight of every provider against the fp64 spec, with the per-token upstream gradient
dL/dlogp_t that the fp64 sequence loss gives each token
(reference_check.linear_logprobs_reference); the scalar losses themselves are not compared.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import prefkern
from prefkern.bench.core import Case, Problem, Suite, add_peer, scalar_loss_step
from prefkern.bench.inputs import IGNORE_INDEX, logit_stats, peaked_problem
from prefkern.bench.reference_check import linear_logprobs_reference
from prefkern.bench.suites import register
from prefkern.reference import linear_logprobs_ref, preference_loss_ref

SHAPES = {  # (pairs, tokens per sequence, H, V)
    "default": [(4, 2048, 4096, 128256), (16, 4096, 4096, 128256)],
    "small": [(2, 256, 256, 16000)],
    "tiny": [(2, 32, 64, 1000)],
}
BETA = 0.1
CHECK_LIMIT = 32768 * 152064  # tokens x vocab up to which the fp64 check runs


def _batch(pairs, t, h, v, dtype, device):
    """Policy and reference hidden states (2B, T, H), shared LM head, targets with the first
    quarter of each row a prompt (ignored) and ragged ends."""
    n = 2 * pairs * t
    hidden, weight, targets = peaked_problem(n, h, v, dtype, device)
    ref_hidden, _, _ = peaked_problem(n, h, v, dtype, device, seed=1)
    ref_hidden = (hidden.float() + 0.1 * ref_hidden.float()).to(dtype)  # a nearby model
    targets = targets.view(2 * pairs, t)
    pos = torch.arange(t, device=device)[None]
    ends = t - torch.arange(2 * pairs, device=device)[:, None] * (t // (8 * pairs) + 1)
    targets = torch.where((pos < t // 4) | (pos >= ends), IGNORE_INDEX, targets)
    return hidden.view(2 * pairs, t, h), weight, targets, ref_hidden.view(2 * pairs, t, h)


def _eager(hidden, weight, targets, ref_hidden):
    def sums(h):
        log_p = (h @ weight.T).float().log_softmax(-1)
        logp = log_p.gather(-1, targets.clamp_min(0)[..., None])[..., 0]
        return logp.masked_fill(targets == IGNORE_INDEX, 0.0).sum(-1)

    def step():
        with torch.no_grad():
            ref = sums(ref_hidden)
        pol = sums(hidden)
        b = pol.shape[0] // 2
        logits = BETA * ((pol[:b] - ref[:b]) - (pol[b:] - ref[b:]))
        return -F.logsigmoid(logits).mean()

    return step


def _prefkern(hidden, weight, targets, ref_hidden, backend):
    def step():
        loss, _ = prefkern.losses.linear_preference_loss(
            hidden, weight, targets, ref_hidden=ref_hidden, ref_weight=weight.detach(),
            loss_type="sigmoid", beta=BETA, backend=backend)
        return loss

    return step


def _liger(hidden, weight, targets, ref_hidden):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    module = LigerFusedLinearDPOLoss(beta=BETA, ignore_index=IGNORE_INDEX, use_ref_model=True)

    def step():
        out = module(weight, hidden, targets, ref_input=ref_hidden, ref_weight=weight.detach())
        return out[0] if isinstance(out, tuple) else out

    return step


def _floor(hidden, weight, ref_hidden):
    h2, r2 = hidden.reshape(-1, hidden.shape[-1]), ref_hidden.reshape(-1, hidden.shape[-1])

    def step():
        r2 @ weight.T
        z = h2 @ weight.T
        z @ weight, z.T @ h2

    return step


def _upstream(hidden, weight, targets, ref_hidden) -> torch.Tensor:
    """dL/dlogp_t of the fp64 loss for every token (0 where ignored), from fp64 sequence sums
    computed in row chunks."""
    mask = targets != IGNORE_INDEX
    sums = []
    for rows in (hidden, ref_hidden):
        out = torch.empty(rows.shape[0], dtype=torch.float64, device=rows.device)
        for i in range(rows.shape[0]):
            logp = linear_logprobs_ref(rows[i].double(), weight.double(), targets[i])
            out[i] = torch.where(mask[i], logp, 0).sum()
        sums.append(out)
    pol = sums[0].requires_grad_(True)
    b = pol.shape[0] // 2
    loss = preference_loss_ref(pol[:b], pol[b:], sums[1][:b], sums[1][b:], beta=BETA)
    (g_seq,) = torch.autograd.grad(loss, pol)
    return torch.where(mask, g_seq[:, None], 0).reshape(-1).float()


def _floor_step(fn):
    def step():
        with torch.no_grad():
            fn()  # computes no loss: nothing to check

    return step



def problems(device: torch.device, shapes: str):
    preset = shapes if device.type == "cuda" or shapes != "default" else "small"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for pairs, t, h, v in SHAPES[preset]:
        hidden, weight, targets, ref_hidden = _batch(pairs, t, h, v, dtype, device)
        n = hidden.shape[0] * t
        info = {"input": f"{pairs} pairs x {t} tokens H={h} V={v} peaked",
                "ignored_frac": (targets == IGNORE_INDEX).float().mean().item(),
                **logit_stats(hidden.view(n, h), weight)}
        hid = hidden.detach().reshape(n, h).requires_grad_(True)  # the leaf the gate reads
        wt = weight.detach().requires_grad_(True)
        args = (hid.view(hidden.shape), wt, targets, ref_hidden)
        steps = {"torch_eager": _eager(*args),
                 "prefkern": _prefkern(*args, "triton" if device.type == "cuda" else "torch")}
        skipped = {}
        if device.type == "cuda":
            steps["floor_4gemm"] = _floor(hid.detach(), wt.detach(), ref_hidden)
        add_peer(steps, skipped, "liger_fused_linear_dpo", lambda args=args: _liger(*args), device)
        cases = [Case(name, _floor_step(fn) if name.startswith("floor") else scalar_loss_step(fn),
                      8.0 * n * h * v, "TFLOP/s", (hid, wt))
                 for name, fn in steps.items()]
        reference = None
        if n * v <= CHECK_LIMIT:
            g = _upstream(hidden, weight, targets, ref_hidden)
            reference = linear_logprobs_reference(
                hid, wt, targets.reshape(-1), upstream={"logprobs": g},
                optional_outputs=("logprobs",))
        yield Problem(f"{pairs}x{t} H={h} V={v} dpo sigmoid", "fwd+bwd",
                      str(dtype).removeprefix("torch."), cases, "torch_eager", skipped, info,
                      reference)
        del hidden, weight, ref_hidden


register(Suite("preference", problems,
               "DPO from hidden states with the reference model inside, no (N, V) logits"))
