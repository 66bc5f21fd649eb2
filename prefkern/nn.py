"""nn.Module wrappers: they store options and call the functional API."""

from __future__ import annotations

import torch

from prefkern.ops.linear_logprobs import linear_logprobs


class LinearLogprobs(torch.nn.Module):
    """``module(hidden, weight, targets, bias=None)`` == ``prefkern.linear_logprobs(...)`` with the
    options given at construction."""

    def __init__(self, *, temperature: float = 1.0, ignore_index: int = -100,
                 softcap: float | None = None, return_entropy: bool = False,
                 return_lse: bool = False, mode: str = "auto", deterministic: bool = False,
                 backend: str | None = "auto"):
        super().__init__()
        self.options = dict(temperature=temperature, ignore_index=ignore_index, softcap=softcap,
                            return_entropy=return_entropy, return_lse=return_lse, mode=mode,
                            deterministic=deterministic, backend=backend)

    def forward(self, hidden, weight, targets, bias=None):
        return linear_logprobs(hidden, weight, targets, bias, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
