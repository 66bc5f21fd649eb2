"""The oldest torch prefkern runs on, checked at import (pyproject.toml states the same).

torch 2.8 added half-precision GEMMs with fp32 output, torch.mm/addmm(..., out_dtype=
torch.float32) on CUDA (pytorch/pytorch#150812): fast mode's logits slices are fp32 through it,
at tensor-core speed. Older versions would need fp32 GEMMs, several times slower.
"""

import torch

MIN_TORCH = (2, 8)

if tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2]) < MIN_TORCH:
    raise ImportError(f"prefkern needs torch >= {'.'.join(map(str, MIN_TORCH))}, found "
                      f"{torch.__version__}")
