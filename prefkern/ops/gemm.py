"""GEMMs whose products are accumulated and returned in fp32 for half inputs (the numerics
contract: logits and gradient sums are never rounded to the input dtype)."""

from __future__ import annotations

import functools

import torch


def has_fp32_output_gemm(device: torch.device) -> bool:
    """Whether half-precision GEMMs can return their fp32 accumulator on ``device`` (cuBLAS);
    torch's CPU GEMMs round a half product to the input dtype."""
    return device.type == "cuda"


def fp32_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in fp32 without rounding the product to a's dtype: cuBLAS's fp32-output GEMM
    (torch >= 2.8) on CUDA; elsewhere (the CPU interpreter) the operands are upcast."""
    if a.dtype in (torch.float32, torch.float64):
        return a @ b
    if has_fp32_output_gemm(a.device):
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


@functools.cache
def _inplace_fp32_addmm(device_type: str) -> bool:
    """Whether addmm(out_dtype=fp32, out=acc) accumulates a half-precision product into acc
    in place on this torch/device (no (N, H) temporary). Asked once on tiny constant tensors:
    no RNG draw, no host sync."""
    if device_type != "cuda":
        return False
    a = torch.ones(16, 16, device=device_type, dtype=torch.bfloat16)
    acc = torch.zeros(16, 16, device=device_type)
    try:
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return True


def accumulate_mm(acc32, a, b):
    """acc32 += a @ b with fp32 accumulation and no rounding of the product to a's dtype."""
    if a.dtype == acc32.dtype:
        return acc32.addmm_(a, b)
    if _inplace_fp32_addmm(a.device.type):
        return torch.addmm(acc32, a, b, out_dtype=torch.float32, out=acc32)
    return acc32.add_(fp32_mm(a, b))
