"""Backend resolution: which implementation runs a call.

Every public op takes ``backend=None | "auto" | "triton" | "cuda" | "torch"``; ``None``, the
default, means the ``PREFKERN_BACKEND`` environment variable (unset: ``auto``). Resolution
happens once per call, outside the autograd Function; backward reuses the forward's choice.

- ``auto``: CPU tensors -> torch; CUDA tensors -> the op's preference order (fastest measured
  first), skipping a backend that cannot load (logged once at debug level).
- an explicit backend that cannot run raises :class:`BackendUnavailable` saying why; it is never
  silently downgraded.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os

import torch

BACKENDS = ("auto", "triton", "cuda", "torch")
_log = logging.getLogger("prefkern")


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run this call."""


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_IMPORT_STATUS: dict[str, str | None] = {}


@torch.compiler.assume_constant_result  # torch.compile: evaluated, never traced into
def _import_status(module: str) -> str | None:
    """None if ``module`` imports, else the reason it does not (cached)."""
    if module not in _IMPORT_STATUS:
        try:
            importlib.import_module(module)
            _IMPORT_STATUS[module] = None
        except Exception as err:  # ImportError, or a broken build raising something else
            _IMPORT_STATUS[module] = f"{type(err).__name__}: {err}"
    return _IMPORT_STATUS[module]


def triton_unavailable_reason(device: torch.device) -> str | None:
    reason = _import_status("prefkern._kernels")
    if reason is not None:
        return f"Triton kernels could not be imported ({reason})"
    if device.type == "cpu" and not interpreting():
        return "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)"
    if device.type not in ("cpu", "cuda"):
        return f"Triton backend does not support device {device}"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


def cuda_unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"the CUDA backend needs CUDA tensors, got {device}"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    reason = _import_status("prefkern._C")
    if reason is not None:
        return (f"the CUDA extension prefkern._C is not built ({reason}); reinstall with nvcc "
                "available, or PREFKERN_BUILD_CUDA=1 to see why the build fails")
    return None


_REASONS = {
    "triton": triton_unavailable_reason,
    "cuda": cuda_unavailable_reason,
    "torch": lambda device: None,
}


def requested_backend(backend: str | None) -> str:
    if backend is None:
        backend = os.environ.get("PREFKERN_BACKEND", "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


@functools.cache
def _log_skip_once(op: str, backend: str, reason: str) -> None:
    _log.debug("prefkern.%s: auto skips backend %s: %s", op, backend, reason)


def resolve_backend(op: str, backend: str | None, device: torch.device,
                    implemented: tuple[str, ...], auto_order: tuple[str, ...]) -> str:
    """The backend that runs ``op`` on ``device``.

    implemented: backends that have this op. auto_order: CUDA-device preference, fastest first.
    """
    backend = requested_backend(backend)
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        for candidate in auto_order:
            reason = _REASONS[candidate](device)
            if reason is None:
                return candidate
            _log_skip_once(op, candidate, reason)
        return "torch"
    if backend not in implemented:
        raise BackendUnavailable(
            f"prefkern.{op} has no {backend!r} backend (implemented: {', '.join(implemented)})")
    reason = _REASONS[backend](device)
    if reason is not None:
        raise BackendUnavailable(f"prefkern.{op}: backend {backend!r} cannot run: {reason}")
    return backend


def available_backends(device: str | torch.device = "cuda") -> dict[str, str | None]:
    """Each backend -> None if it can run on ``device``, else the reason it cannot."""
    device = torch.device(device)
    return {name: fn(device) for name, fn in _REASONS.items()}
