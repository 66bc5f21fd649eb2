"""Input validation shared by the public ops: clear Python errors before any kernel launches."""

from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64, torch.uint8, torch.int16)


def check_float(name: str, t: torch.Tensor, allowed=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in allowed:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in allowed]}, got {t.dtype}")


def check_index(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        desc = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"all tensors must be on one device, got {desc}")
    return devices.pop()


def check_positive(name: str, value: float) -> None:
    if not (value > 0):
        raise ValueError(f"{name} must be > 0, got {value}")


def checking_targets() -> bool:
    """Range-checking targets costs one device->host sync; PREFKERN_CHECK_TARGETS=0 skips it
    (and it is skipped while torch.compile traces)."""
    if os.environ.get("PREFKERN_CHECK_TARGETS", "1") == "0":
        return False
    return not torch.compiler.is_compiling()


def check_targets_in_range(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    if not checking_targets() or targets.numel() == 0:
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        first = targets[bad][0].item()
        raise ValueError(f"targets must be in [0, {vocab}) or ignore_index={ignore_index}; "
                         f"found {first} ({int(bad.sum())} bad entries)")
