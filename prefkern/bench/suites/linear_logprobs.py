"""Suite: per-token log-probs (and entropy) from hidden states and the LM-head weight.
Providers and FLOP counts: prefkern/bench/linear_providers.py. Targets: sampled from the model,
IGNORE_FRAC of them ignored (-100). Check: log-probs (and entropy), and in fwd+bwd dhidden and
dweight, every element against the fp64 spec linear_logprobs_ref (logits accumulated in fp32 /
fp64, never rounded to the input dtype), prefkern/bench/reference_check.py."""

from __future__ import annotations

import itertools

import torch

from prefkern.bench.core import Case, Problem, Suite
from prefkern.bench.inputs import ignored_fraction, logit_stats, peaked_problem
from prefkern.bench.linear_providers import as_step, flops, providers
from prefkern.bench.reference_check import linear_logprobs_reference
from prefkern.bench.suites import register

SHAPES = {
    "default": [(8192, 4096, 128256), (16384, 3584, 152064)],
    "small": [(256, 256, 16000)],
    "tiny": [(32, 64, 1000)],
}
IGNORE_FRAC = 0.1  # targets set to -100 (prompt / padding tokens)


def problems(device: torch.device, shapes: str):
    preset = shapes if device.type == "cuda" or shapes != "default" else "small"
    # CPU: fp32 and bf16 (bf16 GEMMs are fast there but round their output: the
    # floor_fp32_logits rows show what keeping the numerics contract costs)
    dtypes = (torch.bfloat16,) if device.type == "cuda" else (torch.float32, torch.bfloat16)
    for (n, h, v), dtype in itertools.product(SHAPES[preset], dtypes):
        hidden, weight, targets = peaked_problem(n, h, v, dtype, device, ignore_frac=IGNORE_FRAC)
        info = {"input": f"N={n} H={h} V={v} peaked", "ignored_frac": ignored_fraction(targets),
                **logit_stats(hidden, weight)}
        gen = torch.Generator().manual_seed(1)
        g_logp, g_ent = (torch.randn(n, generator=gen).to(device) for _ in range(2))
        for mode in ("fwd", "fwd+bwd"):
            for with_entropy in (False, True):
                grad = mode != "fwd"
                hid = hidden.detach().requires_grad_(grad)
                wt = weight.detach().requires_grad_(grad)
                g_e = g_ent if with_entropy else None
                steps, skipped = providers(hid, wt, targets, mode, with_entropy)
                cases = [Case(name, as_step(name, fn, mode, g_logp, g_e), flops(n, h, v, mode),
                              "TFLOP/s", (hid, wt), approx="approx" in name)
                         for name, fn in steps.items()]
                reference = linear_logprobs_reference(
                    hid, wt, targets, with_entropy=with_entropy,
                    upstream={"logprobs": g_logp, "entropy": g_e} if grad else None)
                label = f"N={n} H={h} V={v}" + (" +entropy" if with_entropy else "")
                yield Problem(label, mode, str(dtype).removeprefix("torch."), cases,
                              "torch_eager", skipped, info, reference)
        del hidden, weight


register(Suite("linear_logprobs", problems,
               "log-probs (+entropy) from hidden states and LM head, no (N, V) logits"))
