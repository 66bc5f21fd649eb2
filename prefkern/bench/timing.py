"""Time and peak memory of one callable."""

from __future__ import annotations

import time

import torch


def _reset(grad_to_none) -> None:
    for t in grad_to_none:
        t.grad = None


def time_ms(fn, device: torch.device, grad_to_none=(), quick: bool = False):
    """-> (p50, p20, p80) milliseconds per call."""
    if device.type == "cuda":
        import triton.testing

        def call():
            _reset(grad_to_none)
            fn()

        p50, p20, p80 = triton.testing.do_bench(call, warmup=10 if quick else 25,
                                                rep=30 if quick else 100,
                                                quantiles=[0.5, 0.2, 0.8])
        return p50, p20, p80
    _reset(grad_to_none)
    fn()  # warmup
    samples = []
    deadline = time.perf_counter() + (0.5 if quick else 2.0)
    while len(samples) < 3 or (time.perf_counter() < deadline and len(samples) < 50):
        _reset(grad_to_none)
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    q = torch.tensor(samples).quantile(torch.tensor([0.5, 0.2, 0.8])).tolist()
    return q[0], q[1], q[2]


def peak_extra_gib(fn, device: torch.device, grad_to_none=()) -> float | None:
    """Peak memory above what was allocated before the call, in GiB (CUDA only; gradients the
    call produces count, as they would in training)."""
    if device.type != "cuda":
        return None
    _reset(grad_to_none)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    _reset(grad_to_none)
    return peak / 2**30
