"""Device guard for launchers: run on the tensors' device, not the current one.

Triton compiles for and launches on ``torch.cuda.current_device()`` with that device's current
stream (triton/backends/driver.py: get_current_device = torch.cuda.current_device,
get_current_stream = torch._C._cuda_getCurrentRawStream); prefkern._C launches on the device
that is current when it is called. Tensors on cuda:1 while cuda:0 is current would launch on the
wrong device. ``on_tensor_device`` runs a launcher under ``torch.cuda.device`` of its first CUDA
tensor argument, which makes both the device and the current stream those of the tensors.

Imports torch only (no triton): prefkern._cuda reuses it, so the CUDA backend stays usable
where Triton is not installed.
"""

import functools

import torch

GUARD_ATTR = "__prefkern_device_guarded__"


def _first_cuda_device(args, kwargs):
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor) and a.is_cuda:
            return a.device
    return None


def on_tensor_device(fn):
    """Decorator: call ``fn`` under ``torch.cuda.device(t.device)``, t its first CUDA tensor
    argument (positional, then keyword). No CUDA tensor (CPU / the interpreter): a plain call.
    Costs an isinstance walk over the arguments and a device exchange: no sync, no allocation."""

    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        device = _first_cuda_device(args, kwargs)
        if device is None:
            return fn(*args, **kwargs)
        with torch.cuda.device(device):
            return fn(*args, **kwargs)

    setattr(guarded, GUARD_ATTR, True)
    return guarded


def is_device_guarded(fn) -> bool:
    return getattr(fn, GUARD_ATTR, False) is True
