"""Suite: per-token log-probs (and entropy) from hidden states and the LM-head weight.
Providers and FLOP counts: prefkern/bench/linear_providers.py."""

from __future__ import annotations

import torch

from prefkern.bench.core import Case, Problem, Suite
from prefkern.bench.inputs import logit_stats, peaked_problem
from prefkern.bench.linear_providers import as_step, flops, providers
from prefkern.bench.suites import register

SHAPES = {
    "default": [(8192, 4096, 128256), (16384, 3584, 152064)],
    "small": [(256, 256, 16000)],
    "tiny": [(32, 64, 1000)],
}


def problems(device: torch.device, shapes: str):
    preset = shapes if device.type == "cuda" or shapes != "default" else "small"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for n, h, v in SHAPES[preset]:
        hidden, weight, targets = peaked_problem(n, h, v, dtype, device)
        info = {"input": f"N={n} H={h} V={v} peaked", **logit_stats(hidden, weight)}
        for mode in ("fwd", "fwd+bwd"):
            for with_entropy in (False, True):
                grad = mode != "fwd"
                hid = hidden.detach().requires_grad_(grad)
                wt = weight.detach().requires_grad_(grad)
                steps, skipped = providers(hid, wt, targets, mode, with_entropy)
                cases = [Case(name, as_step(name, fn, mode), flops(n, h, v, mode), "TFLOP/s",
                              (hid, wt), approx="approx" in name)
                         for name, fn in steps.items()]
                label = f"N={n} H={h} V={v}" + (" +entropy" if with_entropy else "")
                yield Problem(label, mode, str(dtype).removeprefix("torch."), cases,
                              "torch_eager", skipped, info)
        del hidden, weight


register(Suite("linear_logprobs", problems,
               "log-probs (+entropy) from hidden states and LM head, no (N, V) logits"))
