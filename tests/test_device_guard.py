"""Launchers run on their tensors' device: Triton compiles for and launches on the current device
(with its current stream), prefkern._C launches on the current device, so every public launcher
in prefkern._kernels.* and prefkern._cuda* is wrapped in on_tensor_device (kernels/_device.py).

CPU: every launcher is marked guarded, and each one enters torch.cuda.device of its first CUDA
tensor before doing anything (a fake tensor reporting cuda:1, a recording torch.cuda.device).
GPU: the ops on cuda:1 while cuda:0 is current (two devices), and on a side stream (one device).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from prefkern._kernels._device import is_device_guarded, on_tensor_device

import prefkern

KERNELS_DIR = Path(__file__).resolve().parents[1] / "kernels"
WRAPPER_MODULES = ("prefkern._cuda", "prefkern._cuda_gae")
# public functions of those modules that launch nothing (name -> why)
NOT_LAUNCHERS = {
    "prefkern._kernels.logits_slice.new_stats": "allocates on the device it is given",
}
# the launchers the ops call today: the enumeration must find at least these
KNOWN_LAUNCHERS = {
    "prefkern._kernels.gae.gae_scan",
    "prefkern._kernels.logprobs_from_logits.logprobs_fwd",
    "prefkern._kernels.logprobs_from_logits.logprobs_bwd",
    "prefkern._kernels.logits_slice.slice_stats_",
    "prefkern._kernels.logits_slice.slice_grad_",
    "prefkern._kernels.linear_logprobs_fused.linear_logprobs_fwd",
    "prefkern._kernels.linear_logprobs_fused.linear_logprobs_bwd",
    "prefkern._cuda.logprobs_fwd",
    "prefkern._cuda.logprobs_bwd",
    "prefkern._cuda_gae.gae_scan",
}


def _modules():
    pytest.importorskip("triton")
    import prefkern._kernels as kernels

    names = [f"prefkern._kernels.{m.name}" for m in pkgutil.iter_modules(kernels.__path__)
             if not m.name.startswith("_")]
    assert len(names) >= 5, names  # gae, linear_logprobs_fused, logits_slice, logprobs, stats
    return [importlib.import_module(n) for n in (*names, *WRAPPER_MODULES)]


def _public_functions():
    """{qualified name: function} of every plain public function defined in those modules
    (@triton.jit kernels are JITFunction objects, not functions)."""
    found = {}
    for mod in _modules():
        for name, obj in vars(mod).items():
            if (not name.startswith("_") and inspect.isfunction(obj)
                    and obj.__module__ == mod.__name__):
                found[f"{mod.__name__}.{name}"] = obj
    return found


def _launchers():
    funcs = _public_functions()
    stale = set(NOT_LAUNCHERS) - set(funcs)
    assert not stale, f"NOT_LAUNCHERS names functions that no longer exist: {stale}"
    return {k: f for k, f in funcs.items() if k not in NOT_LAUNCHERS}


def test_every_public_launcher_is_guarded():
    launchers = _launchers()
    missing = KNOWN_LAUNCHERS - set(launchers)
    assert not missing, f"enumeration missed known launchers: {missing}"
    assert len(launchers) >= len(KNOWN_LAUNCHERS)
    unguarded = sorted(k for k, f in launchers.items() if not is_device_guarded(f))
    assert not unguarded, (f"launchers without @on_tensor_device: {unguarded} (or list them "
                           "in NOT_LAUNCHERS if they launch nothing)")


def test_one_guard_implementation():
    import prefkern._cuda
    import prefkern._cuda_gae

    assert prefkern._cuda.on_tensor_device is on_tensor_device
    assert prefkern._cuda_gae.on_tensor_device is on_tensor_device


def test_guard_module_imports_no_triton():
    """prefkern._cuda imports the guard: kernels/__init__.py and _device.py stay triton-free,
    so the CUDA backend works where Triton is not installed."""
    for name in ("__init__.py", "_device.py"):
        tree = ast.parse((KERNELS_DIR / name).read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                    for a in n.names}
        imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree)
                     if isinstance(n, ast.ImportFrom) and n.level == 0}
        assert imported <= {"functools", "torch"}, f"kernels/{name} imports {imported}"


def test_cuda_wrappers_import_without_triton(tmp_path):
    code = ("import sys; sys.modules['triton'] = None\n"
            "import prefkern._cuda as c, prefkern._cuda_gae as g\n"
            "from prefkern._kernels._device import is_device_guarded as ok\n"
            "print(ok(c.logprobs_fwd) and ok(c.logprobs_bwd) and ok(g.gae_scan))")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "True"


# ------------------------------------------------------------------ the guard's logic on CPU


class _FakeCuda(torch.Tensor):
    """A CPU tensor that reports itself as living on cuda:1."""

    @property
    def device(self):
        return torch.device("cuda", 1)

    @property
    def is_cuda(self):
        return True


def _fake_cuda1() -> torch.Tensor:
    return torch.Tensor._make_subclass(_FakeCuda, torch.zeros(4, 4))


class _Entered(Exception):
    pass


def _recording_device(log, stop_on_enter=False):
    class Recorder:
        def __init__(self, device):
            self.device = torch.device(device)

        def __enter__(self):
            log.append(("enter", self.device))
            if stop_on_enter:
                raise _Entered

        def __exit__(self, *exc):
            log.append(("exit", self.device))
            return False

    return Recorder


def test_guard_enters_the_first_cuda_tensors_device(monkeypatch):
    log = []
    monkeypatch.setattr(torch.cuda, "device", _recording_device(log))

    @on_tensor_device
    def launcher(a, b=None, *, c=None):
        log.append("call")
        return "done"

    assert is_device_guarded(launcher) and not is_device_guarded(launcher.__wrapped__)
    cpu, cuda1 = torch.zeros(2), _fake_cuda1()
    assert launcher(cpu) == "done" and log == ["call"]  # no CUDA tensor: a plain call
    log.clear()
    assert launcher(cpu, cuda1) == "done"
    assert log == [("enter", torch.device("cuda", 1)), "call", ("exit", torch.device("cuda", 1))]
    log.clear()
    launcher(None, c=cuda1)  # keyword arguments count too
    assert log[0] == ("enter", torch.device("cuda", 1))

    @on_tensor_device
    def failing(a):
        raise KeyError("boom")

    log.clear()
    with pytest.raises(KeyError):
        failing(cuda1)
    assert log == [("enter", torch.device("cuda", 1)), ("exit", torch.device("cuda", 1))]


def _launcher_params():
    try:
        return [pytest.param(f, id=name) for name, f in sorted(_launchers().items())]
    except pytest.skip.Exception:  # no triton
        return []


@pytest.mark.parametrize("launcher", _launcher_params())
def test_launcher_enters_its_tensors_device_first(monkeypatch, launcher):
    """Each launcher, given a tensor on cuda:1 as its first argument, enters cuda:1 before it
    does anything else (the recorder stops it there). Without the guard the body runs on the
    fake tensor and fails otherwise, or returns."""
    log = []
    monkeypatch.setattr(torch.cuda, "device", _recording_device(log, stop_on_enter=True))
    params = [p for p in inspect.signature(launcher).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    args = [_fake_cuda1()] + [None] * (len(params) - 1)
    with pytest.raises(_Entered):
        launcher(*args)
    assert log == [("enter", torch.device("cuda", 1))]


def test_launcher_params_not_vacuous():
    assert len(_launcher_params()) >= len(KNOWN_LAUNCHERS)


# ------------------------------------------------------------------------------------ GPU

CASES = [("logprobs_from_logits", "triton"), ("logprobs_from_logits", "cuda"),
         ("linear_logprobs", "fast"), ("linear_logprobs", "min_memory"),
         ("gae", "triton"), ("gae", "cuda")]
SLEEP_CYCLES = 2_000_000_000  # ~1 s on an H100: outlasts the launches and the reads below


def _inputs(op: str, device) -> dict:
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device)
    if op == "logprobs_from_logits":
        return dict(logits=rand(3, 50, 1000), targets=torch.randint(0, 1000, (3, 50),
                                                                  generator=g).to(device))
    if op == "linear_logprobs":
        return dict(hidden=rand(150, 64), weight=rand(1000, 64) * 0.1, bias=rand(1000),
                    targets=torch.randint(0, 1000, (150,), generator=g).to(device))
    mask = (torch.rand(8, 300, generator=g) > 0.2).to(device)
    return dict(rewards=rand(8, 300), values=rand(8, 300), mask=mask)


def _call(op: str, variant: str, x: dict) -> list[torch.Tensor]:
    """Outputs (and, for the log-prob ops, gradients) of one backend/mode; variant "torch" is
    the reference."""
    if op == "gae":
        return list(prefkern.gae(x["rewards"], x["values"], x["mask"], gamma=0.99,
                                 lam_critic=1.0, backend=variant))
    if op == "logprobs_from_logits":
        logits = x["logits"].clone().requires_grad_(True)
        out = prefkern.logprobs_from_logits(logits, x["targets"], temperature=0.7,
                                            return_entropy=True, backend=variant)
        leaves = (logits,)
    else:
        leaves = tuple(x[k].clone().requires_grad_(True) for k in ("hidden", "weight", "bias"))
        backend, mode = ("torch", "auto") if variant == "torch" else ("triton", variant)
        out = prefkern.linear_logprobs(*leaves[:2], x["targets"], leaves[2], softcap=30.0,
                                       return_entropy=True, return_lse=True, mode=mode,
                                       backend=backend)
    outs = [t for t in out if t is not None]
    loss = sum((t * (i + 1)).sum() for i, t in enumerate(outs))
    return outs + list(torch.autograd.grad(loss, leaves))


def _check_same(out, got, expected, device):
    """out: the tensors on the device, got: their values read on the host."""
    assert len(out) == len(got) == len(expected)
    for i, (o, g, e) in enumerate(zip(out, got, expected, strict=True)):
        assert o.device == device, f"output {i} on {o.device}"
        torch.testing.assert_close(g, e.cpu(), rtol=1e-3, atol=1e-3,
                                   msg=lambda m, i=i: f"output {i}: {m}")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("op,variant", CASES)
def test_gpu_runs_on_the_tensors_device(op, variant):
    """Tensors on cuda:1, cuda:0 current and its stream busy (sleeping): work queued on cuda:0
    would not have run when cuda:1's results are read, and the extension would be handed
    cuda:1's stream on cuda:0 (an error)."""
    dev = torch.device("cuda", 1)
    x = _inputs(op, dev)
    expected = _call(op, "torch", x)
    with torch.cuda.device(0):
        _call(op, variant, x)  # warm up: compile/load, allocator blocks
        torch.cuda.synchronize(dev)
        torch.cuda._sleep(SLEEP_CYCLES)
        out = _call(op, variant, x)
        got = [t.cpu() for t in out]  # waits for cuda:1's current stream only
        still_sleeping = not torch.cuda.current_stream(0).query()
        assert torch.cuda.current_device() == 0
    torch.cuda.synchronize(0)
    assert still_sleeping, "cuda:0's sleep ended before the reads: the check proved nothing"
    _check_same(out, got, expected, dev)


@pytest.mark.gpu
@pytest.mark.parametrize("op,variant", CASES)
def test_gpu_runs_on_the_current_stream(op, variant):
    """A side stream current, the default stream busy (sleeping): the results, read on the
    side stream, are right only if every kernel went to the side stream."""
    dev = torch.device("cuda", torch.cuda.current_device())
    x = _inputs(op, dev)
    expected = _call(op, "torch", x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _call(op, variant, x)  # warm up on this stream: compile/load, allocator blocks
    torch.cuda.synchronize()
    default = torch.cuda.current_stream()
    torch.cuda._sleep(SLEEP_CYCLES)
    with torch.cuda.stream(side):
        out = _call(op, variant, x)
        got = [t.cpu() for t in out]  # waits for the side stream only
    still_sleeping = not default.query()
    torch.cuda.synchronize()
    assert still_sleeping, "the default stream's sleep ended before the reads: proved nothing"
    _check_same(out, got, expected, dev)
