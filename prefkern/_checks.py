"""Input validation shared by the public ops: clear Python errors before any kernel launches."""

from __future__ import annotations

import numbers
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
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not (value > 0):
        raise ValueError(f"{name} must be > 0, got {value}")


# How data-dependent checks (target ids in range, cu_seqlens well formed) report bad input:
#   "auto" (default): raise at once on CPU tensors (no device to sync with); on accelerators,
#          never block: bad entries are neutralized before any kernel (never an out-of-bounds
#          read), their outputs become NaN, and a device-side flag records the error for
#          prefkern.raise_on_bad_input() to raise when the caller chooses to sync;
#   "sync": raise at once everywhere (one device-to-host sync per check: a debug switch);
#   "lazy": never raise at once, also on CPU.
CHECKS_ENV = "PREFKERN_CHECKS"
CHECK_MODES = ("auto", "sync", "lazy")

_PENDING: dict[tuple[str, str], torch.Tensor] = {}  # (device, what) -> bool flag on device


def raises_now(device: torch.device) -> bool:
    """Whether a data-dependent check on ``device`` raises at once (see CHECKS_ENV)."""
    mode = os.environ.get(CHECKS_ENV, "auto") or "auto"
    if mode not in CHECK_MODES:
        raise ValueError(f"{CHECKS_ENV} must be one of {CHECK_MODES}, got {mode!r}")
    if torch.compiler.is_compiling():
        return False
    return mode == "sync" or (mode == "auto" and device.type == "cpu")


def report(bad: torch.Tensor, what: str, describe) -> None:
    """``bad``: bool tensor of offending entries. Raise ValueError(describe()) now, or record
    the error on the device without a sync, per :func:`raises_now`."""
    if bad.numel() == 0:
        return
    if raises_now(bad.device):
        if bool(bad.any()):
            raise ValueError(describe())
        return
    if torch.compiler.is_compiling():
        return  # outputs are still NaN-poisoned; a traced graph keeps no Python-side flag
    key = (str(bad.device), what)
    flag = _PENDING.get(key)
    if flag is None:
        with torch.inference_mode(False):  # a flag made under inference_mode could not be
            # updated by the calls outside it
            flag = _PENDING[key] = torch.zeros((), dtype=torch.bool, device=bad.device)
    torch.logical_or(flag, bad.any(), out=flag)


def raise_on_bad_input() -> None:
    """Raise ValueError if any call since the last one met bad input that was not raised at once
    (target ids out of range, malformed cu_seqlens), and clear the record. Syncs with each
    device that has a record: call it where a sync is cheap (e.g. at logging time)."""
    found = [what for (_, what), flag in _PENDING.items() if bool(flag)]
    for flag in _PENDING.values():
        flag.zero_()
    if found:
        raise ValueError("prefkern met bad input since the last check: " + "; ".join(found))


def screen_targets(targets: torch.Tensor, vocab: int, ignore_index: int, op: str):
    """-> (targets safe for any kernel: contiguous int32/int64, bad mask or None). Ids outside
    [0, vocab) that are not ``ignore_index`` raise at once, or (lazy) become ``ignore_index``
    and are returned in the mask so that their outputs can be set to NaN."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"{op}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if targets.dtype not in (torch.int32, torch.int64):
        targets = targets.long()  # uint8/int16 would wrap ignore_index and the vocab bound
    targets = targets.contiguous()  # kernels index ids at unit stride
    if targets.numel() == 0:
        return targets, None
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))

    def describe():
        first = targets[bad][0].item()
        return (f"{op}: targets must be in [0, {vocab}) or ignore_index={ignore_index}; "
                f"found {first} ({int(bad.sum())} bad entries)")

    report(bad, f"{op}: target ids outside [0, {vocab})", describe)
    if raises_now(targets.device):
        return targets, None
    return torch.where(bad, torch.full_like(targets, ignore_index), targets), bad


def poison(out: torch.Tensor, bad: torch.Tensor | None) -> torch.Tensor:
    """NaN where ``bad`` (a lazily reported bad input), so the error cannot pass silently."""
    return out if bad is None else torch.where(bad.view(out.shape), float("nan"), out)
