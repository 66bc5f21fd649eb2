"""Launcher-side arguments of the head transform, shared by the log-prob kernels."""

import torch


def softcap_args(softcap) -> tuple[float, bool]:
    """(cap value, SOFTCAP constexpr) for a softcap that may be None."""
    return (1.0 if softcap is None else float(softcap)), softcap is not None


def temperature_args(inv_temp, like: torch.Tensor) -> dict:
    """Kernel arguments for a scalar inv_temp or an (N,) fp32 tensor of per-row factors
    (``like`` stands in for the pointer when there is none)."""
    if isinstance(inv_temp, torch.Tensor):
        return dict(inv_temp=1.0, inv_temp_ptr=inv_temp, ROW_TEMP=True)
    return dict(inv_temp=float(inv_temp), inv_temp_ptr=like, ROW_TEMP=False)
