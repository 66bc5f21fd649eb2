"""Sweeps: fwd+bwd log-probs from hidden states and the LM head (the linear_logprobs suite's
providers, checks and peaked inputs) over the number of tokens N and over the vocabulary V,
plotted as time and peak memory against the swept size (results.sweep_plot). Run them by name:
``python -m prefkern bench --suite sweep_tokens --suite sweep_vocab``."""

from __future__ import annotations

import torch

from prefkern.bench.core import Case, Problem, Suite
from prefkern.bench.inputs import peaked_problem
from prefkern.bench.linear_providers import as_step, flops, providers
from prefkern.bench.reference_check import linear_logprobs_reference
from prefkern.bench.suites import register
from prefkern.bench.suites.linear_logprobs import IGNORE_FRAC

# (H, V, [N...]) and (N, H, [V...]) per device kind; Llama-3-8B's head on a GPU
TOKENS = {"cuda": (4096, 128256, [1024, 2048, 4096, 8192, 16384]),
          "cpu": (256, 16000, [64, 128, 256, 512, 1024])}
VOCAB = {"cuda": (8192, 4096, [32000, 64000, 128256, 152064, 256000]),
         "cpu": (256, 256, [2000, 4000, 8000, 16000, 32000])}
AXES = {"tokens": "N", "vocab": "V"}
TINY = {"tokens": (64, 1000, [16, 32]), "vocab": (32, 64, [500, 1000])}


def _shapes(axis: str, device: torch.device, preset: str):
    kind = "cuda" if device.type == "cuda" and preset == "default" else "cpu"
    if preset == "tiny":
        fixed_a, fixed_b, values = TINY[axis]
    else:
        fixed_a, fixed_b, values = (TOKENS if axis == "tokens" else VOCAB)[kind]
    if axis == "tokens":
        return [(n, fixed_a, fixed_b) for n in values]
    return [(fixed_a, fixed_b, v) for v in values]


def _problems(axis: str):
    def problems(device: torch.device, shapes: str):
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        for n, h, v in _shapes(axis, device, shapes):
            hidden, weight, targets = peaked_problem(n, h, v, dtype, device,
                                                     ignore_frac=IGNORE_FRAC)
            g_logp = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(device)
            hid, wt = hidden.requires_grad_(True), weight.requires_grad_(True)
            steps, skipped = providers(hid, wt, targets, "fwd+bwd", with_entropy=False)
            cases = [Case(name, as_step(name, fn, "fwd+bwd", g_logp), flops(n, h, v, "fwd+bwd"),
                          "TFLOP/s", (hid, wt), approx="approx" in name)
                     for name, fn in steps.items()]
            reference = linear_logprobs_reference(hid, wt, targets, with_entropy=False,
                                                  upstream={"logprobs": g_logp})
            yield Problem(f"N={n} H={h} V={v}", "fwd+bwd", str(dtype).removeprefix("torch."),
                          cases, "torch_eager", skipped, reference=reference,
                          params={"N": n, "H": h, "V": v, "sweep_axis": AXES[axis]})
            del hidden, weight, hid, wt

    return problems


register(Suite("sweep_tokens", _problems("tokens"),
               "fwd+bwd linear log-probs over the number of tokens N (time, memory vs N)",
               sweep=AXES["tokens"]))
register(Suite("sweep_vocab", _problems("vocab"),
               "fwd+bwd linear log-probs over the vocabulary V (time, memory vs V)",
               sweep=AXES["vocab"]))
