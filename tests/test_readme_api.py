"""README.md against the code: every ``prefkern.*`` name it writes resolves, every signature it
writes names real parameters with their real defaults, every test file, test name and
environment variable it cites exists. Documentation that drifts from the code fails here."""

from __future__ import annotations

import ast
import importlib
import inspect
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _resolve(name: str):
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:]:
            obj = getattr(obj, part)
        return obj
    raise ImportError(name)


NAMES = sorted(set(re.findall(r"`(prefkern(?:\.\w+)+)", README)))
# `prefkern.fn(a, b=1, *, c=None, ...)`: a signature as the README states it (not a call)
SIGNATURES = [(m.group(1), m.group(2)) for m in re.finditer(r"`(prefkern(?:\.\w+)+)\(([^`]*)\)`",
                                                             README)
              if "=" in m.group(2) or "*" in m.group(2)]


@pytest.mark.parametrize("name", NAMES)
def test_every_name_resolves(name):
    _resolve(name)


def _stated_parameters(args: str):
    for arg in re.split(r",\s*", args):
        arg = arg.strip()
        if not arg or arg in ("*", "...") or arg.startswith("**"):
            continue
        name, _, default = arg.partition("=")
        yield name.strip(), default.strip() or None


@pytest.mark.parametrize("name,args", SIGNATURES, ids=[s[0] for s in SIGNATURES])
def test_every_stated_signature_matches(name, args):
    params = inspect.signature(_resolve(name)).parameters
    for param, default in _stated_parameters(args):
        assert param in params, f"{name}: README names a parameter {param!r} it does not take"
        if default is not None:
            real = params[param].default
            assert real is not inspect.Parameter.empty, f"{name}: {param} has no default"
            assert ast.literal_eval(default) == real, \
                f"{name}: README says {param}={default}, the code {real!r}"


def test_the_signature_check_can_fail():
    params = list(_stated_parameters("x, *, beta=0.5, gamma=None"))
    assert params == [("x", None), ("beta", "0.5"), ("gamma", "None")]
    with pytest.raises(AssertionError, match="README says"):
        test_every_stated_signature_matches("prefkern.kl_estimate", 'logprobs, kind="k2"')
    with pytest.raises(AssertionError, match="does not take"):
        test_every_stated_signature_matches("prefkern.kl_estimate", "logprobs, clamp=1.0")


def test_cited_files_tests_and_variables_exist():
    for path in set(re.findall(r"((?:tests|benchmarks|examples)/[\w/]+\.(?:py|sh))", README)):
        assert (ROOT / path).exists(), path
    for path, test in re.findall(r"(tests/\w+\.py)::(\w+)", README):
        assert f"def {test}" in (ROOT / path).read_text(), f"{path}::{test}"
    sources = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    for test in set(re.findall(r"`(test_\w+)`", README)):
        assert f"def {test}" in sources, test
    code = "\n".join(p.read_text() for d in ("prefkern", "tests", "benchmarks", ".ci")
                     for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".sh", "")
                     and p.is_file()) + (ROOT / "setup.py").read_text()
    for variable in set(re.findall(r"`(PREFKERN_\w+)", README)):
        assert variable in code, variable
