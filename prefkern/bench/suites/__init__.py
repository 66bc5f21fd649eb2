"""Registered benchmark suites (name -> Suite). Each module registers itself on import."""

from __future__ import annotations

from prefkern.bench.core import Suite

SUITES: dict[str, Suite] = {}


def register(suite: Suite) -> Suite:
    SUITES[suite.name] = suite
    return suite


def all_suites() -> dict[str, Suite]:
    from prefkern.bench.suites import gae, linear_logprobs, logprobs_from_logits  # noqa: F401

    return SUITES
