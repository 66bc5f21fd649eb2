"""Time and peak memory of one zero-argument callable.

CUDA: ``triton.testing.do_bench`` (L2 flushed before each call, CUDA events), quantiles
p50/p20/p80 of the per-call times. CPU: ``time.perf_counter`` around each call, same quantiles.
Peak extra memory: CUDA only (``max_memory_allocated`` above what was allocated before the call).
"""

from __future__ import annotations

import time

import torch


def _reset(grad_to_none) -> None:
    for t in grad_to_none:
        t.grad = None


def time_ms(fn, device: torch.device, grad_to_none=(), quick: bool = False,
            warm: bool = False) -> tuple[float, float, float]:
    """-> (p50, p20, p80) milliseconds per call. ``warm``: fn has already run once (CPU: no
    separate warmup call)."""
    if device.type == "cuda":
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(fn, warmup=10 if quick else 25,
                                                rep=30 if quick else 100,
                                                grad_to_none=list(grad_to_none),
                                                quantiles=[0.5, 0.2, 0.8])
        return p50, p20, p80
    if not warm:
        _reset(grad_to_none)
        fn()
    samples = []
    # a time budget rather than a count: CPU cases range from microseconds to seconds
    deadline = time.perf_counter() + (0.3 if quick else 1.5)
    while len(samples) < 3 or (time.perf_counter() < deadline and len(samples) < 50):
        _reset(grad_to_none)
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    q = torch.tensor(samples, dtype=torch.float64).quantile(
        torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
    return q[0], q[1], q[2]


def peak_extra_gib(fn, device: torch.device, grad_to_none=()) -> float | None:
    """Peak memory above what was allocated before one call, in GiB: CUDA only, None elsewhere
    (CPU allocators expose no peak counter). Gradients the call produces count, as they would
    in training; the inputs were allocated before and do not."""
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
