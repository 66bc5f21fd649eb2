"""Benchmark harness shared by ``python -m prefkern bench`` and the scripts in benchmarks/.

Protocol (DESIGN.md): peers side by side in one run on the same device and inputs, realistic
(peaked) logits, median ms with p20/p80, peak extra memory, throughput, ratios to a baseline.
On CUDA, times come from triton.testing.do_bench; on CPU from time.perf_counter.

Adding a suite: create ``prefkern/bench/suites/<name>.py`` defining a :class:`Suite` and
decorating it with ``@register``; import it in ``suites/__init__.py``. A suite yields, per shape,
the :class:`Case` objects to time (provider name, a zero-argument callable, the bytes or FLOPs
one call moves or does, tensors whose .grad to reset between calls).
"""

from prefkern.bench.core import Case, Suite, run_suites

__all__ = ["Case", "Suite", "run_suites"]
