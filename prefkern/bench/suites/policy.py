"""Suite: GRPO-style policy loss from hidden states and the LM head (TRL's ``dapo`` loss type:
the PPO-clipped surrogate, token-mean over the batch), old log-probs precomputed, G completions
per prompt with sequence-level advantages, the first quarter of each row a prompt (ignored).

Providers:
  torch_eager               TRL-style: bf16 logits, fp32 log_softmax, gather, the loss
  liger_fused_linear_grpo   Liger-Kernel's LigerFusedLinearGRPOLoss (loss_type="dapo")
  prefkern_fused            prefkern.losses.linear_policy_loss: the gradient in the forward
                            pass, 3 GEMMs
  prefkern_two_pass         the same with fused=False (a recomputing backward, 4 GEMMs)
  floor_3gemm               cuBLAS: forward, dh, dW
FLOPs counted: 6NHV (N = B T tokens). Check (up to N*V = 32768 * 152064: the first GPU shape;
the largest, where eager cannot run, is reported unchecked): dhidden and dweight
against the fp64 spec with the per-token upstream gradient the fp64 loss gives each token.
"""

from __future__ import annotations

import torch

import prefkern
from prefkern.bench.core import Case, Problem, Suite, add_peer, scalar_loss_step
from prefkern.bench.inputs import IGNORE_INDEX, logit_stats, peaked_problem
from prefkern.bench.reference_check import linear_logprobs_reference
from prefkern.bench.suites import register
from prefkern.reference import linear_logprobs_ref, policy_loss_ref

SHAPES = {  # (completions, tokens each, H, V)
    "default": [(16, 2048, 4096, 128256), (64, 4096, 4096, 152064)],
    "small": [(4, 256, 256, 16000)],
    "tiny": [(4, 32, 64, 1000)],
}
CHECK_LIMIT = 32768 * 152064
LOSS = dict(loss_type="dapo", eps_low=0.2, eps_high=0.28, ratio_log_clamp=None)


def _batch(b, t, h, v, dtype, device):
    hidden, weight, targets = peaked_problem(b * t, h, v, dtype, device)
    targets = targets.view(b, t)
    pos = torch.arange(t, device=device)[None]
    ends = t - torch.arange(b, device=device)[:, None] * (t // (4 * b) + 1)
    targets = torch.where((pos < t // 4) | (pos >= ends), IGNORE_INDEX, targets)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        old = torch.empty(b, t, device=device)
        for i in range(b):  # the sampler's log-probs: the policy's, slightly off
            old[i] = linear_logprobs_ref(hidden.view(b, t, h)[i], weight, targets[i])
        old += 0.05 * torch.randn(b, t, generator=gen).to(device)
    adv = torch.randn(b, generator=gen).to(device)
    return hidden.view(b, t, h), weight, targets, old, adv


def _eager(hidden, weight, targets, old, adv):
    def step():
        log_p = (hidden @ weight.T).float().log_softmax(-1)
        logp = log_p.gather(-1, targets.clamp_min(0)[..., None])[..., 0]
        mask = targets != IGNORE_INDEX
        coef = torch.exp(logp - old)
        a = adv[:, None]
        per_token = -torch.minimum(coef * a, coef.clamp(0.8, 1.28) * a)
        return torch.where(mask, per_token, 0).sum() / mask.sum().clamp(min=1)

    return step


def _prefkern(hidden, weight, targets, old, adv, backend, fused):
    def step():
        loss, _ = prefkern.losses.linear_policy_loss(hidden, weight, targets, old, adv,
                                                     fused=fused, backend=backend, **LOSS)
        return loss

    return step


def _liger(hidden, weight, targets, old, adv):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    module = LigerFusedLinearGRPOLoss(beta=0.0, epsilon_low=0.2, epsilon_high=0.28,
                                      loss_type="dapo", use_ref_model=False)
    attention = (targets != IGNORE_INDEX).long()

    def step():
        out = module(hidden, weight, targets.clamp_min(0), attention, adv,
                     old_per_token_logps=old)
        return out[0] if isinstance(out, tuple) else out

    return step


def _floor(hidden, weight):
    h2 = hidden.reshape(-1, hidden.shape[-1])

    def step():
        with torch.no_grad():
            z = h2 @ weight.T
            z @ weight, z.T @ h2

    return step


def _upstream(hidden, weight, targets, old, adv):
    """dL/dlogp_t of the fp64 loss (fp64 per-token log-probs, row by row)."""
    logp = torch.stack([linear_logprobs_ref(hidden[i].double(), weight.double(), targets[i])
                        for i in range(hidden.shape[0])]).requires_grad_(True)
    loss = policy_loss_ref(logp, old, adv, targets != IGNORE_INDEX, **LOSS)
    (g,) = torch.autograd.grad(loss, logp)
    return g.reshape(-1).float()



def problems(device: torch.device, shapes: str):
    preset = shapes if device.type == "cuda" or shapes != "default" else "small"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backend = "triton" if device.type == "cuda" else "torch"
    for b, t, h, v in SHAPES[preset]:
        hidden, weight, targets, old, adv = _batch(b, t, h, v, dtype, device)
        n = b * t
        info = {"input": f"{b} completions x {t} tokens H={h} V={v} peaked",
                "ignored_frac": (targets == IGNORE_INDEX).float().mean().item(),
                **logit_stats(hidden.view(n, h), weight)}
        hid = hidden.detach().reshape(n, h).requires_grad_(True)
        wt = weight.detach().requires_grad_(True)
        args = (hid.view(b, t, h), wt, targets, old, adv)
        steps = {"torch_eager": _eager(*args),
                 "prefkern_fused": _prefkern(*args, backend, True),
                 "prefkern_two_pass": _prefkern(*args, backend, False)}
        skipped = {}
        add_peer(steps, skipped, "liger_fused_linear_grpo", lambda args=args: _liger(*args), device)
        cases = [Case(name, scalar_loss_step(fn), 6.0 * n * h * v, "TFLOP/s", (hid, wt))
                 for name, fn in steps.items()]
        if device.type == "cuda":
            cases.append(Case("floor_3gemm", _floor(hid.detach().view(b, t, h), wt.detach()),
                              6.0 * n * h * v, "TFLOP/s"))
        reference = None
        if n * v <= CHECK_LIMIT:
            reference = linear_logprobs_reference(
                hid, wt, targets.reshape(-1),
                upstream={"logprobs": _upstream(hidden, weight, targets, old, adv)},
                optional_outputs=("logprobs",))
        yield Problem(f"{b}x{t} H={h} V={v} dapo", "fwd+bwd", str(dtype).removeprefix("torch."),
                      cases, "torch_eager", skipped, info, reference)
        del hidden, weight


register(Suite("policy", problems,
               "GRPO-style policy loss from hidden states, gradient in the forward pass"))
