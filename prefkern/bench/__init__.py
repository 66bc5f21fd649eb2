"""Benchmark harness shared by ``python -m prefkern bench`` and the scripts in benchmarks/.

Protocol (benchmarks/README.md): peers side by side in one run on the same device and
inputs, realistic (peaked) logits, median ms with p20/p80, peak extra memory, GB/s or
TFLOP/s, ratios to a baseline provider. Before timing, every provider's first call is
checked: with a problem ``reference`` (reference_check.py), every element of its per-token
outputs and gradients against the spec on fp64 inputs under prefkern.testing's rule
(err_over_bound > 1: MISMATCH); without one, every element against the baseline's result.
One that fails gets an error row.
Times: ``triton.testing.do_bench`` on CUDA, ``time.perf_counter`` on CPU (timing.py).

Modules: core.py (Case, Problem, Suite, the runner), reference_check.py (the gate's chunked
fp64 reference), timing.py, inputs.py (peaked problems, ignored targets), results.py (metadata,
JSON/CSV/PNG, the table), suites/<name>.py (one suite each).

Adding a suite: create ``prefkern/bench/suites/<name>.py`` with a function
``problems(device, shapes)`` that yields :class:`Problem` objects (one per shape and mode:
its :class:`Case` list -- provider name, zero-argument callable doing one step and returning
what to compare, bytes or FLOPs per call, tensors whose ``.grad`` the step produces -- the
baseline provider's name, peers skipped with the reason, facts about the input, and ideally
the ground truth of the check, e.g. a :mod:`prefkern.bench.reference_check` reference built
from the op's prefkern.reference spec), and end the file with
``register(Suite("<name>", problems, "one-line description"))``. Every module in suites/ is
imported by ``all_suites()``; no other file changes. ``shapes`` is a preset name
("default", "small", "tiny"); on CPU "default" should mean shapes that run in seconds.
A provider named ``copy...`` is the bandwidth reference of its problem (the "% copy" column).
"""

from prefkern.bench.core import Case, Problem, Suite, run_problem, run_suites

__all__ = ["Case", "Problem", "Suite", "run_problem", "run_suites"]
