"""The LM-head transform every log-prob op applies before its softmax, and its folding into the
two numbers the kernels take.

``z = softcap(logit_scale * (hidden @ weight.T + bias)) / T`` with ``softcap(x) = c * tanh(x / c)``
(the order of TRL's chunked LM head; Cohere multiplies by ``logit_scale``, Granite divides by
``logits_scaling``, Falcon-H1 multiplies by ``lm_head_multiplier``, Gemma 2/3 softcap).

A positive scale folds exactly into the kernels' ``z = c' * tanh(raw / c') * inv_temp``:
``c * tanh(s * raw / c) / T = (c / s) * tanh(raw / (c / s)) * (s / T)``, so ``c' = c / s`` and
``inv_temp = s / T`` (without softcap, ``z = raw * s / T``). T may be one value per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from prefkern import _checks
from prefkern._autocast import autocast_dtype


@dataclass(frozen=True)
class Head:
    """What the kernels take: ``z = softcap * tanh(raw / softcap) * inv_temp`` (no tanh when
    softcap is None), where ``inv_temp`` is ``row_inv_temp[row]`` when that is given."""

    inv_temp: float
    softcap: float | None
    row_inv_temp: Tensor | None  # (N,) fp32 contiguous, or None


def as_rows(temperature, rows_shape: torch.Size):
    """A 0-d temperature tensor as one value per row (read without a host sync)."""
    if isinstance(temperature, Tensor) and temperature.dim() == 0:
        return temperature.expand(rows_shape)
    return temperature


def check_temperature(temperature, rows_shape: torch.Size, device: torch.device) -> None:
    """A float > 0, or a floating tensor shaped like the rows (one value per row). A tensor's
    values must be > 0 too: checked as target ids are (:func:`prefkern._checks.report`: at once
    on CPU, else a device-side record, no host sync), and :func:`fold` makes a bad row's
    factor NaN so that its outputs cannot pass for numbers."""
    if isinstance(temperature, Tensor):
        _checks.check_float("temperature", temperature)
        if temperature.shape != rows_shape:
            raise ValueError(f"a temperature tensor must have one value per row, shape "
                             f"{tuple(rows_shape)}, got {tuple(temperature.shape)}")
        if temperature.device != device:
            raise ValueError(f"temperature is on {temperature.device}, the inputs on {device}")
        if temperature.requires_grad:
            raise ValueError("temperature takes no gradient: pass temperature.detach()")
        bad = ~(temperature > 0)  # NaN too
        _checks.report(bad, "per-row temperatures <= 0 or NaN", lambda: (
            f"temperature must be > 0 on every row, found {temperature[bad][0].item()} "
            f"({int(bad.sum())} bad rows)"))
        return
    _checks.check_positive("temperature", temperature)


def check_logit_scale(logit_scale) -> None:
    if logit_scale is not None:
        _checks.check_positive("logit_scale", logit_scale)


def fold(temperature, logit_scale: float | None, softcap: float | None,
         dtype: torch.dtype = torch.float32) -> Head:
    """-> the kernels' Head for ``softcap(logit_scale * raw) / temperature`` (validated inputs);
    per-row factors in ``dtype`` (the compute dtype), divided in fp64 as a float would be."""
    scale = 1.0 if logit_scale is None else float(logit_scale)
    cap = None if softcap is None else float(softcap) / scale
    if isinstance(temperature, Tensor):
        temp = temperature.detach().reshape(-1).to(torch.float64)
        row = torch.where(temp > 0, scale / temp, float("nan")).to(dtype)
        return Head(1.0, cap, row.contiguous())
    return Head(scale / float(temperature), cap, None)


def check_not_released(weight: Tensor, name: str = "weight") -> None:
    """An empty DeepSpeed ZeRO-3 parameter (partitioned between its module's calls) gets a
    message that says what to do."""
    if weight.numel() == 0 and hasattr(weight, "ds_id"):
        raise ValueError(f"{name} is an empty DeepSpeed ZeRO-3 partition: run the op inside the "
                         "head module's call (prefkern.integrations.transformers.head_call / "
                         "head_logprobs / from_linear), whose hooks gather it for the forward "
                         "and again for the backward")


def check_linear(hidden: Tensor, weight: Tensor, bias: Tensor | None,
                 names=("hidden", "weight", "bias")) -> torch.device:
    """hidden (..., H), weight (V, H), bias (V,) or None, one float dtype, one device."""
    h_name, w_name, b_name = names
    _checks.check_float(h_name, hidden)
    _checks.check_float(w_name, weight)
    if hidden.dim() < 1:
        raise ValueError(f"{h_name} must be (..., H)")
    check_not_released(weight, w_name)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or 0 in weight.shape:
        raise ValueError(f"{w_name} must be (V, H) with H = {h_name}.shape[-1] = "
                         f"{hidden.shape[-1]}, V > 0 and H > 0, got {tuple(weight.shape)}"
                         " (a vocab-parallel shard needs at least one row on every rank: pad "
                         "the vocabulary to a multiple of the world size)")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{w_name} dtype {weight.dtype} must match {h_name} dtype {hidden.dtype}")
    if bias is not None:
        _checks.check_float(b_name, bias)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"{b_name} must be ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{b_name} dtype {bias.dtype} must match {h_name} dtype "
                            f"{hidden.dtype}")
    return _checks.check_same_device(**{h_name: hidden, w_name: weight, b_name: bias})


def autocast_inputs(*tensors):
    """Under autocast an LM-head GEMM takes the autocast dtype, as ``F.linear`` would: half and
    single precision inputs are cast (fp64 and None are left alone, as autocast does)."""
    first = next((t for t in tensors if isinstance(t, Tensor)), None)
    dtype = None if first is None else autocast_dtype(first.device)
    if dtype is None:
        return tensors
    cast = (torch.float16, torch.bfloat16, torch.float32)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.dtype in cast else t
                 for t in tensors)


def head_stats(stats: Tensor, hit: Tensor, lead: torch.Size, target_shape, bad_rows):
    """The ops' (N, 4) statistics and (N[, K]) hit flags -> the public HeadStats (NaN on rows
    with a bad target, as the other outputs)."""
    from prefkern.outputs import HeadStats

    def column(k):
        return _checks.poison(stats[:, k].reshape(lead), bad_rows)

    argmax = None if target_shape is None else hit.reshape(target_shape)
    return HeadStats(column(0), column(1), argmax)


def screen_fused_targets(targets: Tensor, weight: Tensor, shard, ignore_index: int, op: str):
    """Targets of a gradient-in-forward loss -> (targets, bad or None) as
    :func:`prefkern._checks.screen_targets` gives them, against the full vocabulary (the
    shard's when the head is vocab parallel)."""
    vocab = weight.shape[0] if shard is None else shard.vocab
    return _checks.screen_targets(targets, vocab, ignore_index, op)
