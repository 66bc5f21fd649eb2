"""No op blocks on the device by default: no .item(), bool(tensor), .tolist(), nonzero or
allclose on its path. Counted on CPU with a TorchFunctionMode (the calls that would sync a GPU);
on a GPU, sync debug mode and a CUDA-graph capture of fwd+bwd check the real thing."""

from __future__ import annotations

import pytest
import torch
from cases import make_targets
from torch.overrides import TorchFunctionMode

import prefkern
from prefkern import _checks

SYNCING = {"item", "__bool__", "__int__", "__float__", "__index__", "tolist", "nonzero",
           "allclose", "equal", "numpy", "cpu"}


class CountSyncs(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCING:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def _linear(backend, mode, device="cpu", skip_ignored=False):
    """skip_ignored=False: what an accelerator does by default (CPU tensors gather the valid
    rows by default, which reads their count)."""
    hidden = torch.randn(16, 32, device=device, requires_grad=True)
    weight = torch.randn(64, 32, device=device, requires_grad=True)
    targets = make_targets((16,), 64, 0.25, device)

    def step():
        out = prefkern.linear_logprobs(hidden, weight, targets, return_entropy=True,
                                       skip_ignored=skip_ignored, backend=backend, mode=mode)
        (out.logprobs.sum() + out.entropy.sum()).backward()
    return step


def _divergence(backend, mode, device="cpu"):
    hidden, ref_hidden = torch.randn(2, 16, 32, device=device).unbind(0)
    weight = torch.randn(64, 32, device=device, requires_grad=True)
    ref_weight = torch.randn(64, 32, device=device)
    targets = make_targets((16,), 64, 0.25, device)
    hidden.requires_grad_(True)

    def step():
        out = prefkern.linear_divergence(hidden, weight, ref_hidden, ref_weight, targets,
                                         kind="jsd", return_logprobs=True, backend=backend,
                                         mode=mode)
        (out.divergence.sum() + out.logprobs.sum()).backward()
    return step


def _logits(backend, device="cpu"):
    logits = torch.randn(4, 8, 64, device=device, requires_grad=True)
    targets = make_targets((4, 8), 64, 0.25, device)

    def step():
        out = prefkern.logprobs_from_logits(logits, targets, return_entropy=True, backend=backend)
        (out.logprobs.sum() + out.entropy.sum()).backward()
    return step


def _gae(backend, device="cpu"):
    rewards, values = torch.randn(2, 2, 9, device=device).unbind(0)
    mask = torch.ones(2, 9, device=device)
    cu = torch.tensor([0, 5, 18], device=device)

    def step():
        prefkern.gae(rewards, values, mask, backend=backend, whiten=True)
        prefkern.gae(rewards.reshape(-1), values.reshape(-1), cu_seqlens=cu, backend=backend)
    return step


def _group(device="cpu"):
    scores = torch.randn(8, device=device)
    groups = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2], device=device)

    def step():
        for method in ("grpo", "rloo", "dr_grpo"):
            prefkern.group_advantages(scores, groups, method=method)
    return step


def _group_losses(device="cpu"):
    from prefkern.losses import astar_po_loss, astar_values, disco_loss, dro_loss, gvpo_loss

    logps = torch.randn(8, device=device, requires_grad=True)
    token_logps = torch.randn(8, 5, device=device, requires_grad=True)
    old, rewards = torch.randn(8, device=device), torch.randint(0, 2, (8,), device=device)
    mask = torch.ones(8, 5, device=device, dtype=torch.bool)
    groups = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2], device=device)

    def step():
        values = astar_values(rewards.float(), groups)
        loss = gvpo_loss(logps, old, rewards.float(), groups)[0] + astar_po_loss(
            logps, old, rewards.float(), values)[0] + dro_loss(
            logps, old, rewards.float(), values, tau=0.1)[0]
        for tau in (None, 10.0):
            loss = loss + disco_loss(token_logps, token_logps.detach() - 0.01, mask,
                                     rewards.float(), groups, tau=tau, delta=0.0)[0]
        loss.backward()
    return step


STEPS = {
    "group_losses": _group_losses,
    "linear_logprobs[torch]": lambda: _linear("torch", "auto"),
    "linear_logprobs[triton-fast]": lambda: _linear("triton", "fast"),
    "linear_logprobs[triton-min_memory]": lambda: _linear("triton", "min_memory"),
    "logprobs_from_logits[torch]": lambda: _logits("torch"),
    "linear_divergence[torch]": lambda: _divergence("torch", "auto"),
    "linear_divergence[triton-fast]": lambda: _divergence("triton", "fast"),
    "linear_divergence[triton-min_memory]": lambda: _divergence("triton", "min_memory"),
    "gae[torch]": lambda: _gae("torch"),
    "group_advantages": _group,
}


@pytest.mark.parametrize("name", list(STEPS))
def test_no_syncing_call_on_the_op_path(name, monkeypatch):
    """The Triton interpreter itself moves data to the host, so Triton launches are counted
    only for the wrapper code that runs before them (it runs the same Python as on a GPU)."""
    monkeypatch.setenv(_checks.CHECKS_ENV, "lazy")  # what GPU tensors get by default
    step = STEPS[name]()
    step()  # first call: imports, caches
    if "triton" in name:
        from prefkern._kernels import (
            divergence,
            divergence_fused,
            linear_logprobs_fused,
            logits_slice,
        )
        for module, fn in ((divergence, "_divergence_fwd_kernel"),
                           (divergence, "_divergence_bwd_kernel"),
                           (divergence_fused, "_fused_divergence_fwd_kernel"),
                           (divergence_fused, "_fused_divergence_sums_kernel"),
                           (divergence_fused, "_fused_divergence_dh_kernel"),
                           (divergence_fused, "_fused_divergence_dw_kernel"),
                           (logits_slice, "_slice_stats_kernel"),
                           (logits_slice, "_slice_grad_kernel"),
                           (linear_logprobs_fused, "_fused_fwd_kernel"),
                           (linear_logprobs_fused, "_fused_dh_kernel"),
                           (linear_logprobs_fused, "_fused_dw_kernel")):
            kernel = getattr(module, fn)
            monkeypatch.setattr(module, fn, _NoLaunch(kernel))
    with CountSyncs() as counter:
        step()
    assert counter.calls == [], f"{name}: syncing calls {counter.calls}"


def test_skipping_ignored_rows_costs_exactly_one_sync(monkeypatch):
    """skip_ignored=True reads the valid-row count: one nonzero, nothing else."""
    monkeypatch.setenv(_checks.CHECKS_ENV, "lazy")  # what GPU tensors get by default
    step = _linear("torch", "auto", skip_ignored=True)
    step()
    with CountSyncs() as counter:
        step()
    assert counter.calls == ["nonzero"]


class _NoLaunch:
    """Stands in for a Triton kernel: launches do nothing (outputs stay as allocated)."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def test_the_counter_sees_a_sync():
    with CountSyncs() as counter:
        t = torch.ones(3)
        bool(t.any())
        t.sum().item()
    assert counter.calls == ["__bool__", "item"]


def test_auto_raises_only_where_it_costs_no_device_sync(monkeypatch):
    monkeypatch.setenv(_checks.CHECKS_ENV, "auto")
    assert _checks.raises_now(torch.device("cpu"))
    assert not _checks.raises_now(torch.device("cuda", 0))
    monkeypatch.setenv(_checks.CHECKS_ENV, "sync")
    assert _checks.raises_now(torch.device("cuda", 0))
    monkeypatch.setenv(_checks.CHECKS_ENV, "bogus")
    with pytest.raises(ValueError, match="PREFKERN_CHECKS"):
        _checks.raises_now(torch.device("cpu"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_lazy_bad_targets_poison_outputs_and_raise_later(backend, monkeypatch):
    monkeypatch.setenv(_checks.CHECKS_ENV, "lazy")
    prefkern.raise_on_bad_input()  # clear earlier records
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(10, 8, requires_grad=True)
    targets = torch.tensor([0, 10, 3, 1 << 40])  # two far out of range: never read
    out = prefkern.linear_logprobs(hidden, weight, targets, return_entropy=True,
                                   backend=backend)
    assert out.logprobs[[1, 3]].isnan().all() and out.logprobs[[0, 2]].isfinite().all()
    out.logprobs.nan_to_num().sum().backward()
    assert hidden.grad[[1, 3]].abs().sum() == 0 and hidden.grad.isfinite().all()
    logp = prefkern.logprobs_from_logits(torch.randn(4, 10), targets, backend=backend)
    assert logp[[1, 3]].isnan().all()
    with pytest.raises(ValueError, match="target ids outside"):
        prefkern.raise_on_bad_input()
    prefkern.raise_on_bad_input()  # the record was cleared


def test_lazy_bad_cu_seqlens_poison_gae(monkeypatch):
    monkeypatch.setenv(_checks.CHECKS_ENV, "lazy")
    prefkern.raise_on_bad_input()
    rewards, values = torch.randn(2, 10).unbind(0)
    adv, ret = prefkern.gae(rewards, values, cu_seqlens=torch.tensor([0, 7, 4, 99]),
                            backend="torch")
    assert adv.isnan().all() and ret.isnan().all()
    with pytest.raises(ValueError, match="cu_seqlens"):
        prefkern.raise_on_bad_input()


# ------------------------------------------------------------------------------------ GPU
GPU_STEPS = {
    "linear_logprobs[triton-fast]": lambda: _linear("triton", "fast", "cuda"),
    "linear_logprobs[triton-min_memory]": lambda: _linear("triton", "min_memory", "cuda"),
    "linear_logprobs[torch]": lambda: _linear("torch", "auto", "cuda"),
    "linear_divergence[triton-fast]": lambda: _divergence("triton", "fast", "cuda"),
    "linear_divergence[triton-min_memory]": lambda: _divergence("triton", "min_memory",
                                                                "cuda"),
    "logprobs_from_logits[triton]": lambda: _logits("triton", "cuda"),
    "logprobs_from_logits[cuda]": lambda: _logits("cuda", "cuda"),
    "logprobs_from_logits[torch]": lambda: _logits("torch", "cuda"),
    "gae[triton]": lambda: _gae("triton", "cuda"),
    "gae[cuda]": lambda: _gae("cuda", "cuda"),
    "gae[torch]": lambda: _gae("torch", "cuda"),
    "group_advantages": lambda: _group("cuda"),
    "group_losses": lambda: _group_losses("cuda"),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_STEPS))
def test_gpu_sync_debug_mode(name):
    step = GPU_STEPS[name]()
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_STEPS))
def test_gpu_cuda_graph_capture_fwd_bwd(name):
    """A fwd+bwd step captured in a CUDA graph and replayed: capture raises on any sync."""
    _capture_and_replay(GPU_STEPS[name]())


def _capture_and_replay(step):
    """Warm ``step`` up on a side stream, capture it in a CUDA graph, replay it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm up: compile kernels, create the lazy-check flags
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_gpu_skip_ignored_is_off_under_graph_capture():
    """skip_ignored=True syncs once per call in eager mode, and not at all while a CUDA graph
    is captured (it computes every row then)."""
    _capture_and_replay(_linear("triton", "fast", "cuda", skip_ignored=True))
