"""CPU-sized cases for pytest-benchmark, comparable across commits:

    pytest benchmarks/ --benchmark-only                  # prints the table
    pytest benchmarks/ --benchmark-only --benchmark-autosave   # .benchmarks/<machine>/NNNN.json
    pytest-benchmark compare 0001 0002                   # two saved runs side by side

Each case has its eager-torch baseline beside it (group = the case). Not part of the test
suite (pyproject's testpaths is tests/); the GPU numbers come from `python -m prefkern bench`.
"""

from __future__ import annotations

import pytest
import torch

import prefkern
from prefkern.bench.inputs import peaked_problem

pytest.importorskip("pytest_benchmark")
torch.manual_seed(0)


def _linear():
    hidden, weight, targets = peaked_problem(256, 256, 16000, torch.float32)
    return hidden.requires_grad_(True), weight.requires_grad_(True), targets


@pytest.mark.benchmark(group="linear_logprobs fwd+bwd N=256 H=256 V=16000 fp32")
@pytest.mark.parametrize("impl", ["eager", "prefkern"])
def test_linear_logprobs(benchmark, impl):
    hidden, weight, targets = _linear()

    def step():
        hidden.grad = weight.grad = None
        if impl == "eager":
            logp = (hidden @ weight.T).float().log_softmax(-1)
            out = logp.gather(-1, targets[:, None])[:, 0]
        else:
            out = prefkern.linear_logprobs(hidden, weight, targets, backend="torch")
        out.sum().backward()

    benchmark(step)


@pytest.mark.benchmark(group="logprobs_from_logits fwd+bwd N=512 V=32000 fp32")
@pytest.mark.parametrize("impl", ["eager", "prefkern"])
def test_logprobs_from_logits(benchmark, impl):
    logits = (torch.randn(512, 32000) * 3).requires_grad_(True)
    targets = torch.randint(0, 32000, (512,))

    def step():
        logits.grad = None
        if impl == "eager":
            out = logits.float().log_softmax(-1).gather(-1, targets[:, None])[:, 0]
        else:
            out = prefkern.logprobs_from_logits(logits, targets, backend="torch")
        out.sum().backward()

    benchmark(step)


@pytest.mark.benchmark(group="gae B=64 T=1024 fp32")
@pytest.mark.parametrize("impl", ["loop", "prefkern"])
def test_gae(benchmark, impl):
    from prefkern.reference.advantages import gae_loop_over_time

    rewards, values = torch.randn(64, 1024), torch.randn(64, 1024)
    mask = torch.ones(64, 1024, dtype=torch.bool)
    if impl == "loop":
        benchmark(lambda: gae_loop_over_time(rewards, values, mask, gamma=0.99, lam=0.95))
    else:
        benchmark(lambda: prefkern.gae(rewards, values, mask, gamma=0.99, lam=0.95,
                                       backend="torch"))
