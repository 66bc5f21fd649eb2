"""Inputs as users hand them, beyond the contiguous int64 tensors of the other tests: strided,
expanded and narrow-dtype targets, expanded logits with inplace_backward, int32 targets on a
vocab-parallel head, a call under inference_mode before a training step, the default backend
from $PREFKERN_BACKEND, and clear errors for malformed arguments. Each case once failed."""

from __future__ import annotations

import pytest
import torch

import prefkern

KERNEL_PATHS = [("torch", "auto"), ("triton", "fast"), ("triton", "min_memory")]


def _problem(n=6, h=16, v=33, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=gen), torch.randn(n, h, generator=gen),
            torch.randn(v, h, generator=gen) * 0.5)


def _ref_logp(logits, targets):
    return logits.double().log_softmax(-1).gather(-1, targets.long()[:, None])[:, 0].float()


@pytest.mark.parametrize("layout", ["strided", "expanded"])
@pytest.mark.parametrize("backend,mode", KERNEL_PATHS)
def test_targets_of_any_stride(layout, backend, mode):
    """Kernels read ids at unit stride: a column of an (N, 2) tensor (stride 2) and one id
    expanded over the rows (stride 0) must give the contiguous result."""
    logits, hidden, weight = _problem()
    n, v = logits.shape
    if layout == "strided":
        targets = torch.randint(0, v, (n, 2), generator=torch.Generator().manual_seed(1))[:, 1]
    else:
        targets = torch.tensor(7).expand(n)
    assert not targets.is_contiguous()
    dense = targets.contiguous()
    got = prefkern.logprobs_from_logits(logits, targets, backend=backend)
    torch.testing.assert_close(got, _ref_logp(logits, dense))
    got = prefkern.linear_logprobs(hidden, weight, targets, backend=backend, mode=mode)
    torch.testing.assert_close(got, _ref_logp(hidden @ weight.T, dense))
    got = prefkern.linear_divergence(hidden, weight, hidden.flip(0), weight, targets,
                                     return_logprobs=True, backend=backend, mode=mode)
    torch.testing.assert_close(got.logprobs, _ref_logp(hidden @ weight.T, dense))
    got = prefkern.logits_divergence(logits, logits.flip(0), targets, return_logprobs=True,
                                     backend=backend)
    torch.testing.assert_close(got.logprobs, _ref_logp(logits, dense))


@pytest.mark.parametrize("backend,mode", KERNEL_PATHS)
def test_narrow_index_dtypes_do_not_wrap(backend, mode):
    """uint8 id 156 is -100 after wrapping to int8 and int16 ids are below a 40000 vocab:
    neither is ignored or out of range."""
    gen = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(3, 8, generator=gen), torch.randn(200, 8, generator=gen)
    targets = torch.tensor([156, 5, 7], dtype=torch.uint8)
    want = _ref_logp(hidden @ weight.T, targets)
    torch.testing.assert_close(prefkern.linear_logprobs(hidden, weight, targets,
                                                        backend=backend, mode=mode), want)
    logits = torch.randn(2, 40000, generator=gen)
    ids = torch.tensor([5, 32000], dtype=torch.int16)
    torch.testing.assert_close(prefkern.logprobs_from_logits(logits, ids, backend=backend),
                               _ref_logp(logits, ids))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shape", [(6, 33), (2, 3, 33)])
def test_inplace_backward_on_expanded_logits(backend, shape):
    """Expanded logits repeat elements: the gradient cannot be written into their storage, so
    it gets its own buffer (before: wrong on Triton, a torch error on the torch backend)."""
    row = torch.randn(shape[-1], generator=torch.Generator().manual_seed(3))
    base = row.clone().requires_grad_(True)
    logits = base.expand(shape)
    targets = torch.arange(logits[..., 0].numel()).reshape(shape[:-1]) % shape[-1]
    prefkern.logprobs_from_logits(logits, targets, inplace_backward=True,
                                  backend=backend).sum().backward()
    ref = row.double().requires_grad_(True)
    _ref_logp(ref.expand(shape).reshape(-1, shape[-1]), targets.reshape(-1)).sum().backward()
    torch.testing.assert_close(base.grad, ref.grad.float())


def test_int32_targets_on_a_vocab_parallel_head(tmp_path):
    import torch.distributed as dist

    _, hidden, weight = _problem()
    targets = torch.randint(0, weight.shape[0], (hidden.shape[0],),
                            generator=torch.Generator().manual_seed(4))
    want = _ref_logp(hidden @ weight.T, targets)
    dist.init_process_group("gloo", rank=0, world_size=1,
                            store=dist.FileStore(str(tmp_path / "store"), 1))
    try:
        group = dist.group.WORLD
        got = prefkern.linear_logprobs(hidden, weight, targets.int(), process_group=group)
        torch.testing.assert_close(got, want)
        got = prefkern.linear_divergence(hidden, weight, hidden, weight, targets.int(),
                                         process_group=group, return_logprobs=True)
        torch.testing.assert_close(got.logprobs, want)
    finally:
        dist.destroy_process_group()


def test_a_call_under_inference_mode_then_a_training_step(monkeypatch):
    """The deferred bad-input flag (every GPU call in the default check mode; "lazy" takes the
    same path on CPU) must not be born an inference tensor."""
    from prefkern import _checks

    monkeypatch.setenv("PREFKERN_CHECKS", "lazy")
    monkeypatch.setattr(_checks, "_PENDING", {})
    logits, _, _ = _problem()
    targets = torch.arange(logits.shape[0])
    with torch.inference_mode():
        prefkern.logprobs_from_logits(logits, targets)
    leaf = logits.clone().requires_grad_(True)
    prefkern.logprobs_from_logits(leaf, targets).sum().backward()
    prefkern.raise_on_bad_input()
    prefkern.logprobs_from_logits(logits, targets + 100)  # out of range: recorded, not raised
    with pytest.raises(ValueError, match="bad input"):
        prefkern.raise_on_bad_input()


def test_the_default_backend_comes_from_the_environment(monkeypatch):
    logits, _, _ = _problem()
    monkeypatch.setenv("PREFKERN_BACKEND", "cuda")
    with pytest.raises(prefkern.BackendUnavailable):
        prefkern.logprobs_from_logits(logits, torch.zeros(6, dtype=torch.long))
    prefkern.logprobs_from_logits(logits, torch.zeros(6, dtype=torch.long), backend="auto")


def test_a_frozen_reference_gets_no_gradient_pass(monkeypatch):
    """Teacher tensors that do not require grad: the backward forms the policy's gradients
    only (no reference dh/dW GEMMs, no fp32 (V, H) buffer)."""
    from prefkern.ops import divergence_passes

    calls = []
    original = divergence_passes.backward

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append([t is not None for t in out])
        return out

    monkeypatch.setattr(divergence_passes, "backward", spy)
    _, hidden, weight = _problem()
    hidden.requires_grad_(True)
    prefkern.linear_divergence(hidden, weight, hidden.detach().flip(0), weight.clone(),
                               kind="jsd", backend="torch").sum().backward()
    assert calls == [[True, False, False]]


@pytest.mark.parametrize("case", ["zero_hidden", "list_targets"])
@pytest.mark.parametrize("op", ["linear_logprobs", "linear_divergence"])
def test_malformed_arguments_get_a_named_error(case, op):
    _, hidden, weight = _problem()
    targets = [0] * hidden.shape[0]
    if case == "zero_hidden":
        hidden, weight, targets = hidden[:, :0], weight[:, :0], torch.zeros(6, dtype=torch.long)
    call = (lambda: prefkern.linear_logprobs(hidden, weight, targets)) \
        if op == "linear_logprobs" else \
        (lambda: prefkern.linear_divergence(hidden, weight, hidden, weight, targets))
    error = ValueError if case == "zero_hidden" else TypeError
    with pytest.raises(error, match="H > 0" if case == "zero_hidden" else "targets"):
        call()


def test_a_one_column_vocab_of_any_stride():
    """(N, 1) logits viewed from an (1, N) row have stride N along V (is_contiguous ignores
    size-1 dims, so .contiguous() does not change it): the kernels must accept them."""
    logits = torch.randn(1, 6).t()
    got = prefkern.logits_divergence(logits, logits.clone(), backend="triton")
    assert torch.equal(got, torch.zeros(6))


@pytest.mark.parametrize("backend,mode", KERNEL_PATHS)
def test_per_row_temperatures_must_be_positive(backend, mode, monkeypatch):
    """A row's temperature <= 0 (or NaN) raises on CPU; in the deferred mode (a GPU's default)
    it is recorded and the row's outputs are NaN, never a flipped distribution."""
    from prefkern import _checks

    _, hidden, weight = _problem()
    temps = torch.tensor([1.0, 0.5, -1.0, 2.0, 0.0, 1.0])
    targets = torch.arange(6)
    call = lambda: prefkern.linear_logprobs(hidden, weight, targets,  # noqa: E731
                                            temperature=temps, backend=backend, mode=mode)
    with pytest.raises(ValueError, match="temperature must be > 0 on every row, found -1"):
        call()
    monkeypatch.setenv("PREFKERN_CHECKS", "lazy")
    monkeypatch.setattr(_checks, "_PENDING", {})
    out = call()
    assert out[[2, 4]].isnan().all() and out[[0, 1, 3, 5]].isfinite().all()
    with pytest.raises(ValueError, match="temperatures <= 0"):
        prefkern.raise_on_bad_input()


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(temperature=[1.0, 2.0]), TypeError, "temperature must be a real number"),
    (dict(softcap="2"), TypeError, "softcap must be a real number"),
    (dict(logit_scale=True), TypeError, "logit_scale must be a real number"),
    (dict(ignore_index=None), TypeError, "ignore_index must be an int"),
    (dict(temperature=0.0), ValueError, "temperature must be > 0"),
])
def test_scalar_options_get_named_errors(kwargs, error, match):
    _, hidden, weight = _problem()
    with pytest.raises(error, match=match):
        prefkern.linear_logprobs(hidden, weight, torch.zeros(6, dtype=torch.long), **kwargs)


def test_an_empty_vocab_shard_is_named():
    """A rank whose vocab shard has no row (V < world size) must say why: it raises before any
    collective while the other ranks wait in one."""
    hidden = torch.randn(4, 8)
    with pytest.raises(ValueError, match="pad the vocabulary to a multiple of the world size"):
        prefkern.linear_logprobs(hidden, torch.randn(0, 8), torch.zeros(4, dtype=torch.long),
                                 process_group=object(), vocab_start=2, vocab_size=2,
                                 backend="torch")
