"""pyproject's torch floor is what prefkern checks at import, and the installed torch has the
features the floor stands for."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from prefkern._torch_floor import MIN_TORCH

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_states_the_checked_floor():
    text = (ROOT / "pyproject.toml").read_text()
    (floor,) = re.findall(r'^\s*"torch>=([\d.]+)"', text, flags=re.M)
    assert tuple(int(p) for p in floor.split(".")[:2]) == MIN_TORCH


def test_installed_torch_has_the_fp32_output_gemm():
    version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    assert version >= MIN_TORCH
    # the overloads fast mode calls on CUDA (CPU builds register them too, without a kernel)
    assert hasattr(torch.ops.aten.mm, "dtype")
    assert hasattr(torch.ops.aten.addmm, "dtype_out")
    a = torch.ones(4, 4, dtype=torch.bfloat16, device="meta")
    assert torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
