"""Registered benchmark suites (name -> Suite).

Every module in this folder is imported by :func:`all_suites` and registers its suite on import
with :func:`register`, so adding a suite is adding a file; nothing here changes.
"""

from __future__ import annotations

import importlib
import pkgutil

from prefkern.bench.core import Suite

SUITES: dict[str, Suite] = {}


def register(suite: Suite) -> Suite:
    known = SUITES.get(suite.name)
    if known is not None and known.problems.__module__ != suite.problems.__module__:
        raise ValueError(f"two benchmark suites named {suite.name!r}")
    SUITES[suite.name] = suite
    return suite


def all_suites() -> dict[str, Suite]:
    """Import every suite module (once) -> {name: Suite}, in name order."""
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")
    return dict(sorted(SUITES.items()))
