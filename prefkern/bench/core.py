"""Suites, cases and the runner: check each provider, then time it.

The check: a problem with a ``reference`` (reference_check.py: the spec on fp64 inputs, in row
chunks) compares every element of each provider's outputs and gradients with it under
prefkern.testing's rule; a problem without one (gae) compares every element with the baseline
provider's result, within ``rtol`` of its scale.

A result row (one provider, one mode, one shape) has: op, provider, mode, shape, dtype, status
("ok", "MISMATCH", "unchecked", "error: ...", "skipped: ..."), ms_p50/ms_p20/ms_p80,
peak_extra_GiB, GBps or TFLOPs (work / median time), ratio_to_baseline (median / the baseline's
median), pct_of_copy (GB/s rows, when the problem has a ``copy*`` provider: GB/s / copy GB/s),
max_rel_err (worst max|x - ref| / max|ref| over outputs and gradients; ref = the fp64 reference,
or the baseline's result without one) and, with a reference, err_over_bound (worst
max|x - ref| / the rule's bound: above 1 is MISMATCH) and check (that ratio per tensor).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from prefkern.bench.timing import peak_extra_gib, time_ms

UNITS = {"GB/s": ("GBps", 1e-9), "TFLOP/s": ("TFLOPs", 1e-12)}


@dataclass
class Case:
    """One provider on one input.

    ``fn`` does one step and returns what is checked (a tensor, or a tuple of them: with a
    problem reference, the per-token outputs in the order of its output_names, e.g.
    (logp, entropy or None)), or None for providers that compute something else (matmul
    floors, copies: not checked, status "ok" with no error columns). ``work`` is the bytes
    (unit "GB/s") or FLOPs ("TFLOP/s") of one call. ``grad_to_none``: the tensors whose
    ``.grad`` the step produces; reset between timed calls, and checked after the first call
    (in the order of the reference's grad_names). ``approx``: a method that computes something
    close on purpose (may be MISMATCH; kept visible)."""

    provider: str
    fn: Callable[[], object]
    work: float
    unit: str
    grad_to_none: tuple = ()
    approx: bool = False


@dataclass
class Problem:
    """One shape and mode of a suite: its cases, the baseline provider (the ratio denominator,
    and the check's reference when the problem has no ``reference``), providers skipped with
    the reason, facts about the input."""

    shape: str
    mode: str
    dtype: str
    cases: list[Case]
    baseline: str
    skipped: dict[str, str] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    # ground truth of the check: an object with check(outputs, grads) -> [TensorCheck] and
    # release() (prefkern.bench.reference_check); None: compare with the baseline's result
    reference: object = None
    # numbers copied into every row of the problem (a sweep's x axis: {"N": 4096, ...})
    params: dict = field(default_factory=dict)


@dataclass
class Suite:
    """``problems(device, shapes)`` yields Problems; ``shapes`` is a preset name ("default",
    "small", "tiny") that the suite interprets for the device (CPU: "default" means small).
    ``sweep``: the row parameter a sweep suite varies (its results are plotted against it);
    sweeps run only when named (``--suite``), not in the default run."""

    name: str
    problems: Callable[[torch.device, str], Iterable[Problem]]
    description: str = ""
    sweep: str | None = None


def _signature(case: Case, value) -> dict[str, torch.Tensor] | None:
    """What one call produced, for the check against the baseline: outputs, then the gradients
    it left behind, every element (fp64 copies: meant for small problems such as gae)."""
    if value is None:
        return None
    outs = value if isinstance(value, tuple) else (value,)
    sig = {f"out{i}": o.detach().double() for i, o in enumerate(outs)
           if isinstance(o, torch.Tensor)}
    for i, t in enumerate(case.grad_to_none):
        if t.grad is not None:
            sig[f"grad{i}"] = t.grad.detach().double()
    return sig


def _gate(reference, case: Case, value) -> tuple[str, dict]:
    """Check one provider's call against the problem's reference -> (status, row columns)."""
    if value is None:  # computes something else (copy, matmul floor): nothing to check
        return "ok", {}
    outs = value if isinstance(value, tuple) else (value,)
    checks = reference.check(outs, tuple(t.grad for t in case.grad_to_none))
    cols = {"max_rel_err": max(c.rel_err for c in checks),
            "err_over_bound": max(c.ratio for c in checks),
            "check": " ".join(f"{c.name}={c.why or f'{c.ratio:.3g}'}" for c in checks)}
    return ("ok" if all(c.ok for c in checks) else "MISMATCH"), cols


def max_rel_err(sig: dict, ref: dict) -> float:
    """max over the reference's tensors of max|x - ref| / max|ref| (inf if one is missing or
    shaped differently)."""
    worst = 0.0
    for key, r in ref.items():
        x = sig.get(key)
        if x is None or x.shape != r.shape:
            return float("inf")
        err = ((x - r).abs().max() / r.abs().max().clamp_min(1e-12)).item()
        worst = max(worst, err if err == err else float("inf"))  # NaN counts as a mismatch
    return worst


def run_problem(suite: str, problem: Problem, device: torch.device, quick: bool = False,
                check: bool = True, rtol: float = 2e-2) -> list[dict]:
    """Run the baseline first, then every other case: one checked call (which also warms up),
    then timing and peak memory. A failing provider gives an error row, never an exception.
    ``rtol``: the tolerance of problems without a reference."""
    rows, reference = [], None
    cases = sorted(problem.cases, key=lambda c: c.provider != problem.baseline)
    for case in cases:
        row = dict(op=suite, provider=case.provider, mode=problem.mode, shape=problem.shape,
                   dtype=problem.dtype, approx=case.approx, **problem.params)
        try:
            for t in case.grad_to_none:
                t.grad = None
            status = "ok"
            if check and problem.reference is not None:
                status, cols = _gate(problem.reference, case, case.fn())
                row.update(cols)
            elif check:
                sig = _signature(case, case.fn())
                if case.provider == problem.baseline:
                    reference = sig
                elif sig is not None and reference is None:
                    status = "unchecked"
                elif sig is not None:
                    row["max_rel_err"] = max_rel_err(sig, reference)
                    if not row["max_rel_err"] <= rtol:
                        status = "MISMATCH"
                del sig
            p50, p20, p80 = time_ms(case.fn, device, case.grad_to_none, quick, warm=check)
            peak = peak_extra_gib(case.fn, device, case.grad_to_none)
        except Exception as err:  # a peer failing must not sink the run
            rows.append({**row, "status": f"error: {type(err).__name__}: {err}"[:200]})
            continue
        finally:
            for t in case.grad_to_none:
                t.grad = None
        metric, scale = UNITS[case.unit]
        row.update(status=status, ms_p50=p50, ms_p20=p20, ms_p80=p80, peak_extra_GiB=peak)
        row[metric] = case.work * scale / (p50 * 1e-3)
        rows.append(row)
    if problem.reference is not None:
        problem.reference.release()
    _relative_columns(rows, problem.baseline)
    for name, why in problem.skipped.items():
        rows.append(dict(op=suite, provider=name, mode=problem.mode, shape=problem.shape,
                         dtype=problem.dtype, status=f"skipped: {why}"))
    return rows


def _relative_columns(rows: list[dict], baseline: str) -> None:
    base_ms = next((r.get("ms_p50") for r in rows if r["provider"] == baseline), None)
    copy_bw = next((r.get("GBps") for r in rows if r["provider"].startswith("copy")), None)
    for r in rows:
        if base_ms and r.get("ms_p50"):
            r["baseline"] = baseline
            r["ratio_to_baseline"] = r["ms_p50"] / base_ms
        if copy_bw and r.get("GBps"):
            r["pct_of_copy"] = 100.0 * r["GBps"] / copy_bw


class _NoBar:
    """Stands in for tqdm where it is not installed (the bench extra brings it)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    write = staticmethod(print)

    def set_postfix_str(self, *args, **kwargs):
        pass

    def update(self, *args):
        pass


def _progress():
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(desc="bench", unit="problem", delay=2.0, disable=None, leave=False)


def run_suites(suites: list[Suite], device: torch.device, shapes: str = "default",
               quick: bool = False, check: bool = True,
               log=None) -> tuple[list[dict], list[dict]]:
    """-> (result rows, input descriptions: one per distinct input, e.g. logit statistics).
    A progress bar (tqdm, on a terminal, once a run takes more than 2 s) counts the problems;
    ``log`` (default: printed above the bar) gets one line per new input."""
    rows, infos = [], []
    with _progress() as bar:
        say = log or bar.write
        for suite in suites:
            for problem in suite.problems(device, shapes):
                info = dict(op=suite.name, **problem.info)
                if problem.info and info not in infos:  # once per input, not per mode
                    infos.append(info)
                    facts = {k: v for k, v in problem.info.items() if k != "input"}
                    say(f"[{suite.name}] input {problem.info.get('input', '')}: " + ", ".join(
                        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in facts.items()))
                bar.set_postfix_str(f"{suite.name} {problem.mode} {problem.shape} "
                                    f"({len(problem.cases)} providers)", refresh=False)
                rows.extend(run_problem(suite.name, problem, device, quick, check))
                bar.update()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows, infos


def scalar_loss_step(fn: Callable[[], torch.Tensor]) -> Callable[[], tuple]:
    """The step of a provider that returns a reduced loss: backward, and nothing per token to
    check (the gate checks the gradients it left in .grad)."""
    def step():
        fn().backward()
        return (None,)

    return step


def add_peer(steps: dict, skipped: dict, name: str, make: Callable[[], Callable],
             device: torch.device, needs_cuda: bool = True) -> None:
    """steps[name] = make() for a peer that may not be installed (and may need CUDA); else
    the reason goes to skipped."""
    if needs_cuda and device.type != "cuda":
        skipped[name] = "needs a CUDA device"
        return
    try:
        steps[name] = make()
    except ImportError as err:
        skipped[name] = f"not installed ({err.name})"
