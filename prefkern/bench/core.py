"""Suites, cases and the runner: check each provider against the baseline, then time it."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from prefkern.bench.timing import peak_extra_gib, time_ms


@dataclass
class Case:
    """One provider on one input. ``work`` is bytes (unit "GB/s") or FLOPs ("TFLOP/s") per call.
    ``fn`` returns something comparable with the baseline's result (a scalar or a tensor), or
    None for providers that compute something else (matmul floors, copies)."""

    provider: str
    fn: Callable[[], object]
    work: float
    unit: str
    grad_to_none: tuple = ()
    approx: bool = False


@dataclass
class Problem:
    """One shape of a suite: its cases, the baseline provider and facts to report."""

    shape: str
    mode: str
    dtype: str
    cases: list[Case]
    baseline: str
    skipped: dict[str, str] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


@dataclass
class Suite:
    """``problems(device, shapes)`` yields Problems; shapes is a preset name ("default",
    "small", "tiny") that the suite interprets for the device."""

    name: str
    problems: Callable[[torch.device, str], Iterable[Problem]]
    description: str = ""


def _comparable(x) -> torch.Tensor | None:
    if x is None:
        return None
    if isinstance(x, tuple):
        x = x[0]
    return x.detach().double().reshape(-1) if isinstance(x, torch.Tensor) else None


def _agrees(value, reference, rtol: float) -> bool:
    if value.shape != reference.shape:
        return False
    scale = reference.abs().max().clamp_min(1e-6)
    return bool(((value - reference).abs().max() / scale) <= rtol)


def run_problem(suite: str, problem: Problem, device: torch.device, quick: bool,
                rtol: float = 2e-2) -> list[dict]:
    rows = []
    reference = None
    base = next((c for c in problem.cases if c.provider == problem.baseline), None)
    if base is not None:
        reference = _comparable(base.fn())
    for case in problem.cases:
        row = dict(op=suite, provider=case.provider, mode=problem.mode, shape=problem.shape,
                   dtype=problem.dtype, unit=case.unit, approx=case.approx)
        try:
            value = _comparable(case.fn())
            status = "ok"
            if value is not None and reference is not None and not _agrees(value, reference,
                                                                            rtol):
                status = "MISMATCH"
            p50, p20, p80 = time_ms(case.fn, device, case.grad_to_none, quick)
            peak = peak_extra_gib(case.fn, device, case.grad_to_none)
        except Exception as err:  # a peer failing must not sink the run
            rows.append({**row, "status": f"error: {type(err).__name__}: {err}"[:200]})
            continue
        scale = 1e-9 if case.unit == "GB/s" else 1e-12
        row.update(status=status, ms_p50=p50, ms_p20=p20, ms_p80=p80, peak_extra_GiB=peak,
                   throughput=case.work * scale / (p50 * 1e-3))
        rows.append(row)
    base_ms = next((r.get("ms_p50") for r in rows if r["provider"] == problem.baseline), None)
    for r in rows:
        if base_ms and r.get("ms_p50"):
            r["ratio_to_" + problem.baseline] = r["ms_p50"] / base_ms
    for name, why in problem.skipped.items():
        rows.append(dict(op=suite, provider=name, mode=problem.mode, shape=problem.shape,
                         dtype=problem.dtype, status=f"skipped: {why}"))
    return rows


def run_suites(suites: list[Suite], device: torch.device, shapes: str = "default",
               quick: bool = False, log=print) -> tuple[list[dict], list[dict]]:
    """-> (result rows, problem infos)."""
    rows, infos = [], []
    for suite in suites:
        for problem in suite.problems(device, shapes):
            log(f"[{suite.name}] {problem.mode} {problem.shape} {problem.dtype} "
                f"({len(problem.cases)} providers)")
            info = dict(op=suite.name, **problem.info)
            if problem.info and info not in infos:  # one line per input, not per mode
                infos.append(info)
            rows.extend(run_problem(suite.name, problem, device, quick))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows, infos
