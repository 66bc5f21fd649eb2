"""The gradient GEMMs of a pass that forms d loss / d logits one chunk of whole rows at a time
(the gradient-in-the-forward losses): dh of the chunk's rows is complete at once, dW and db
accumulate over the chunks in fp32 (a (V, H) buffer for half-precision weights)."""

from __future__ import annotations

import torch
from torch import Tensor

from prefkern.ops import gemm
from prefkern.reference.logprobs import compute_dtype


class RowChunkGrads:
    """dh, dW, db of ``hidden @ weight.T + bias`` from d-logit chunks over rows."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None,
                 need: tuple[bool, bool, bool], fp32_dh: bool = False):
        """``fp32_dh``: keep dh in the compute dtype (partial sums still to be reduced)."""
        self.hidden, self.weight, self.bias = hidden, weight, bias
        acc = compute_dtype(weight.dtype)
        self.dh = None
        if need[0]:
            self.dh = torch.empty(hidden.shape, dtype=compute_dtype(hidden.dtype),
                                  device=hidden.device) if fp32_dh else torch.empty_like(hidden)
        self.dw32 = torch.zeros(weight.shape, dtype=acc, device=weight.device) \
            if need[1] else None
        self.db32 = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) \
            if need[2] and bias is not None else None

    def add(self, rows: slice, dz: Tensor) -> None:
        """dz (r, V): d loss / d raw logits of ``rows`` (the only rounding: to the GEMMs'
        input dtype)."""
        dz_in = dz if dz.dtype == self.hidden.dtype else dz.to(self.hidden.dtype)
        if self.dh is not None:
            self.dh[rows] = gemm.fp32_mm(dz_in, self.weight).to(self.dh.dtype)
        if self.dw32 is not None:
            gemm.accumulate_mm(self.dw32, dz_in.T, self.hidden[rows])
        if self.db32 is not None:
            self.db32 += dz.sum(0)

    def result(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        dw = None if self.dw32 is None else self.dw32.to(self.weight.dtype)
        db = None if self.db32 is None else self.db32.to(self.bias.dtype)
        return self.dh, dw, db
