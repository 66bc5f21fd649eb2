"""Suite: GAE / EGAE advantages. The baseline ``loop_as_verl_1dda039`` is verl's Python loop over
time (verl-project/verl 1dda039, verl/trainer/ppo/core_algos.py compute_gae_advantage_return:
one step per token, masked positions carry the next value and advantage through), reimplemented
without its final whitening and vectorized over the rows as there
(prefkern.reference.advantages.gae_loop_over_time); against prefkern's backends and a device
copy moving the same bytes (read rewards, values, mask; write advantages and returns in fp32):
throughput / copy throughput is the fraction of achievable bandwidth. The gate: the comparison
rule against the loop on fp64 inputs, the fp32 loop as the base (reference_check.WholeReference)."""

from __future__ import annotations

import torch

import prefkern
from prefkern.bench.core import Case, Problem, Suite
from prefkern.bench.reference_check import WholeReference
from prefkern.bench.suites import register
from prefkern.reference.advantages import gae_loop_over_time

SHAPES = {
    "default": [(256, 2048), (1024, 8192), (256, 32768)],
    "small": [(64, 512)],
    "tiny": [(8, 64)],
}


def make_inputs(n_rows: int, seq_len: int, device, seed: int = 0, hole_frac: float = 0.05):
    """Ragged responses (lengths uniform in [T/2, T]) with tool-call holes; half truncated."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rewards = torch.randn(n_rows, seq_len, generator=gen)
    values = torch.randn(n_rows, seq_len, generator=gen)
    lengths = torch.randint(seq_len // 2, seq_len + 1, (n_rows,), generator=gen)
    mask = torch.arange(seq_len)[None] < lengths[:, None]
    mask &= torch.rand(n_rows, seq_len, generator=gen) >= hole_frac
    truncated = torch.rand(n_rows, generator=gen) < 0.5
    return tuple(t.to(device) for t in (rewards, values, mask, truncated))


def _call(fn, inputs, kw):
    return lambda: fn(*inputs, **kw)


def problems(device: torch.device, shapes: str):
    preset = shapes if device.type == "cuda" or shapes != "default" else "small"
    backends = ["torch"]
    if device.type == "cuda":
        status = prefkern.available_backends(device)
        backends += [b for b in ("triton", "cuda") if status[b] is None]
    for n_rows, seq_len in SHAPES[preset]:
        rewards, values, mask, truncated = make_inputs(n_rows, seq_len, device)
        moved = (rewards.numel() * 4 + values.numel() * 4 + mask.numel() * mask.element_size()
                 + 2 * rewards.numel() * 4)
        for mode, kw in (("gae", {}), ("egae", {"truncated": truncated, "lam_critic": 1.0})):
            kw = dict(gamma=1.0, lam=0.95, **kw)
            inputs = (rewards, values, mask)
            cases = [Case("loop_as_verl_1dda039", _call(gae_loop_over_time, inputs, kw), moved,
                          "GB/s")]
            for b in backends:
                cases.append(Case(f"prefkern_{b}", _call(prefkern.gae, inputs, dict(kw, backend=b)),
                                  moved, "GB/s"))
            if device.type == "cuda":
                src = torch.empty(moved // 2, dtype=torch.uint8, device=device)
                dst = torch.empty_like(src)
                cases.append(Case("copy_floor", lambda src=src, dst=dst: (dst.copy_(src), None)[1],
                                  moved, "GB/s"))
            # the rule against the loop in fp64: each advantage sums up to T discounted terms
            reference = WholeReference(gae_loop_over_time, inputs, kw,
                                       ("advantages", "returns"), seq_len)
            yield Problem(f"B={n_rows} T={seq_len}", mode, "fp32", cases, "loop_as_verl_1dda039",
                          reference=reference)


register(Suite("gae", problems, "GAE / EGAE advantages vs the Python loop over time"))
