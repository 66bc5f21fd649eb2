"""Time and peak memory of one zero-argument callable.

CUDA: ``triton.testing.do_bench`` (L2 flushed before each call, CUDA events), quantiles
p50/p20/p80 of the per-call times. CPU: ``time.perf_counter`` around each call, same quantiles.
Peak extra memory: CUDA ``max_memory_allocated`` above what was allocated before the call; CPU:
the profiler's memory timeline of tensor allocations during the call (peak_extra_gib).
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
    """Peak memory above what was allocated before one call, in GiB. Gradients the call
    produces count, as they would in training; the inputs were allocated before and do not.
    CUDA: ``max_memory_allocated``. CPU: the tensor allocations and frees torch's profiler
    records during the call (its memory timeline), whose running total's maximum is the peak;
    memory not owned by tensors is not seen. None when neither is available."""
    _reset(grad_to_none)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    elif device.type == "cpu":
        peak = _cpu_peak_bytes(fn)
    else:
        return None
    _reset(grad_to_none)
    return None if peak is None else peak / 2**30


CPU_PEAK_METHOD = "torch.profiler memory timeline (tensor allocations)"


def _cpu_peak_bytes(fn) -> int | None:
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True,
                     record_shapes=True, with_stack=True) as prof:
            fn()
        timeline = prof._memory_profile().timeline
    except Exception:  # a torch without the memory timeline: no CPU figure rather than a wrong one
        return None
    live = peak = 0
    for _, action, _, size in sorted(timeline, key=lambda item: item[0]):
        name = getattr(action, "name", str(action))
        if name == "CREATE":
            live += size
        elif name == "DESTROY":
            live -= size
        peak = max(peak, live)
    return peak
