"""Backend dispatch as prefkern/dispatch.py documents it: call-time resolution, env default,
explicit choices never downgraded, auto = torch on CPU."""

from __future__ import annotations

import pytest
import torch

import prefkern
from prefkern.dispatch import BackendUnavailable, resolve_backend

CPU = torch.device("cpu")
ALL = ("triton", "cuda", "torch")


def test_auto_on_cpu_is_torch():
    assert resolve_backend("op", "auto", CPU, ALL, ("triton", "cuda")) == "torch"


def test_env_var_is_the_default_and_read_at_call_time(monkeypatch):
    monkeypatch.setenv("PREFKERN_BACKEND", "torch")
    assert resolve_backend("op", None, CPU, ALL, ("triton",)) == "torch"
    monkeypatch.setenv("PREFKERN_BACKEND", "cuda")
    with pytest.raises(BackendUnavailable, match="needs CUDA tensors"):
        resolve_backend("op", None, CPU, ALL, ("triton",))
    monkeypatch.setenv("PREFKERN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("op", None, CPU, ALL, ("triton",))


def test_explicit_argument_beats_env(monkeypatch):
    monkeypatch.setenv("PREFKERN_BACKEND", "cuda")
    logits = torch.randn(3, 10)
    targets = torch.tensor([1, 2, 3])
    out = prefkern.logprobs_from_logits(logits, targets, backend="torch")
    torch.testing.assert_close(out, prefkern.reference.logprobs_from_logits_ref(logits, targets))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        resolve_backend("op", "triton", CPU, ALL, ("triton",))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("op", "triton", CPU, ALL, ("triton",)) == "triton"


def test_unimplemented_backend_is_named():
    with pytest.raises(BackendUnavailable, match=r"no 'cuda' backend \(implemented: triton, torch"):
        resolve_backend("op", "cuda", CPU, ("triton", "torch"), ("triton",))


def test_available_backends_reports_reasons():
    status = prefkern.available_backends("cpu")
    assert status["torch"] is None
    assert "CUDA tensors" in status["cuda"]
