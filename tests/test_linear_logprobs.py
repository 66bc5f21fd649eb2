"""linear_logprobs against its reference: outputs and the gradients of hidden, weight and bias,
every backend and mode."""

from __future__ import annotations

import pytest
import torch
from cases import make_targets
from compare import assert_equal_to_rounding, assert_rule, contract_dlogits, leaf, noisiest

import prefkern
from prefkern.reference import linear_logprobs_ref
from prefkern.reference.logprobs import head_logits, linear_logits

# (backend, mode); Triton runs in the interpreter on CPU
VARIANTS = [("torch", "auto"), ("triton", "fast"), ("triton", "min_memory")]
IDS = ["torch", "triton-fast", "triton-minmem"]


def make_problem(n, h, v, dtype, device="cpu", kind="normal", with_bias=False):
    hidden = torch.randn(n, h, device=device)
    weight = torch.randn(v, h, device=device) * (3.0 / h**0.5)
    if kind == "extreme":
        weight = weight * 300.0
    elif kind == "negative":
        hidden[:, 0] = 1.0
        weight[:, 0] = -200.0
    bias = torch.randn(v, device=device) if with_bias else None
    cast = lambda t: None if t is None else t.to(dtype)
    return cast(hidden), cast(weight), cast(bias)


def _run(fn, hidden, weight, bias, targets, grads, **kw):
    out = fn(hidden, weight, targets, bias, return_entropy=True, return_lse=True, **kw)
    loss = sum((o * g).sum() for o, g in zip(out, grads, strict=True) if g is not None)
    loss.backward()
    return (*out, hidden.grad, weight.grad, None if bias is None else bias.grad)


NAMES = ["logprobs", "entropy", "lse", "dhidden", "dweight", "dbias"]


def row_temperatures(n, device="cpu"):
    return torch.rand(n, device=device) * 1.5 + 0.3


def check_case(backend, mode, n, h, v, dtype, *, device="cpu", kind="normal", ignore_frac=0.25,
               temperature=1.0, softcap=None, with_bias=False, grads=("logp", "ent", "lse"),
               deterministic=False, logit_scale=None, k=None, no_targets=False):
    """k: (n, k) targets; no_targets: targets=None; temperature may be a tensor (n,)."""
    hidden, weight, bias = make_problem(n, h, v, dtype, device, kind, with_bias)
    lead = (n,) if k is None else (n, k)
    targets = None if no_targets else make_targets(lead, v, ignore_frac, device)
    all_grads = {"logp": torch.randn(lead, device=device), "ent": torch.randn(n, device=device),
                 "lse": torch.randn(n, device=device)}
    g = [all_grads[name] if name in grads and not (no_targets and name == "logp") else None
         for name in ("logp", "ent", "lse")]
    kw = dict(temperature=temperature, softcap=softcap, logit_scale=logit_scale)

    def leaves(dtype_=None):
        return [None if t is None else leaf(t, dtype_) for t in (hidden, weight, bias)]

    ours = _run(lambda *a, **k: prefkern.linear_logprobs(
        *a, backend=backend, mode=mode, deterministic=deterministic, **k),
        *leaves(), targets, g, **kw)
    ref = _run(linear_logprobs_ref, *leaves(torch.float64), targets,
               [None if x is None else x.double() for x in g], **kw)
    # the spec in the given order of H and others: each rounds the logits differently, by
    # ~1e-4 where |z| ~ 5000 (kind "extreme"), and a correct kernel is one more order
    bases = [_run(linear_logprobs_ref, *leaves(), targets, g, **kw)]
    gen = torch.Generator().manual_seed(0)
    orders = 7 if kind in ("extreme", "negative") else 1
    for perm in [torch.arange(h - 1, -1, -1)] + [torch.randperm(h, generator=gen)
                                                 for _ in range(orders - 1)]:
        hp, wp, bp = (None if t is None else leaf(t[..., perm] if t.dim() == 2 else t)
                      for t in (hidden, weight, bias))
        run = _run(linear_logprobs_ref, hp, wp, bp, targets, g, **kw)
        back = torch.argsort(perm)
        bases.append((*run[:3], *(None if x is None else x[..., back] for x in run[3:5]),
                      run[5]))
    if dtype == torch.float32:  # and the contract's gradients, from its stored lse and entropy
        hp, wp, bp = leaves()
        z = head_logits(linear_logits(hp, wp, bp), temperature, logit_scale, softcap)
        z.backward(contract_dlogits(z, targets, *g))
        bases.append((None, None, None, hp.grad, wp.grad, None if bp is None else bp.grad))
    base = [noisiest(r, *cands) for r, *cands in zip(ref, *bases, strict=True)]
    for name, o, r, b in zip(NAMES, ours, ref, base, strict=True):
        if r is None:
            assert o is None, name
            continue
        assert o.dtype == (torch.float32 if name in NAMES[:3] else dtype), name
        # dweight and dbias sum over tokens, everything else over the vocabulary
        assert_rule(o, r, b, name, reduction=n if name in ("dweight", "dbias") else v)
    if targets is not None:
        ignored = targets == -100
        rows_ignored = ignored if k is None else ignored.all(-1)
        assert (ours[0][ignored] == 0).all() and (ours[3][rows_ignored] == 0).all()
    return ours


@pytest.mark.parametrize("backend,mode", VARIANTS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,h,v", [(37, 129, 1000), (64, 64, 512)])
def test_shapes(backend, mode, dtype, n, h, v):
    check_case(backend, mode, n, h, v, dtype)


@pytest.mark.parametrize("backend,mode", VARIANTS, ids=IDS)
def test_fp16_bias_softcap_temperature(backend, mode):
    check_case(backend, mode, 23, 48, 300, torch.float16, with_bias=True, softcap=7.5,
               temperature=0.7)


@pytest.mark.parametrize("backend,mode", VARIANTS, ids=IDS)
@pytest.mark.parametrize("kind", ["extreme", "negative"])
def test_extreme_logits(backend, mode, kind):
    check_case(backend, mode, 19, 32, 257, torch.float32, kind=kind, ignore_frac=0.0)


@pytest.mark.parametrize("backend,mode", VARIANTS, ids=IDS)
@pytest.mark.parametrize("grads", [("logp",), ("ent",), ("lse",), ("logp", "ent")])
def test_each_upstream_gradient(backend, mode, grads):
    check_case(backend, mode, 21, 40, 200, torch.float32, grads=grads, with_bias=True)


@pytest.mark.parametrize("backend,mode", VARIANTS, ids=IDS)
@pytest.mark.parametrize("softcap", [None, 6.0], ids=["plain", "softcap"])
def test_logit_scale(backend, mode, softcap):
    """softcap(s * (h @ W.T + b)) / T in that order (TRL's chunked head), gradients included."""
    check_case(backend, mode, 29, 40, 300, torch.bfloat16, with_bias=True, softcap=softcap,
               logit_scale=0.0625 * 24, temperature=0.8)


@pytest.mark.parametrize("backend,mode", VARIANTS, ids=IDS)
@pytest.mark.parametrize("softcap", [None, 5.0], ids=["plain", "softcap"])
def test_per_row_temperature(backend, mode, softcap):
    check_case(backend, mode, 33, 48, 260, torch.float32, with_bias=True, softcap=softcap,
               temperature=row_temperatures(33), logit_scale=1.5)


@pytest.mark.parametrize("backend,mode", VARIANTS, ids=IDS)
def test_per_row_temperature_equal_to_the_scalar(backend, mode):
    """Rows that share one temperature give the scalar's results bit for bit."""
    hidden, weight, bias = make_problem(20, 32, 150, torch.bfloat16, with_bias=True)
    targets = make_targets((20,), 150, 0.2)
    outs = []
    for temperature in (0.75, torch.full((4, 5), 0.75)):
        h, w, b = leaf(hidden), leaf(weight), leaf(bias)
        out = prefkern.linear_logprobs(h.view(4, 5, 32), w, targets.view(4, 5), b,
                                       temperature=temperature, softcap=9.0,
                                       return_entropy=True, backend=backend, mode=mode)
        (out.logprobs.sum() + out.entropy.square().sum()).backward()
        outs.append((out.logprobs, out.entropy, h.grad, w.grad, b.grad))
    for got, want in zip(*outs, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend,mode", VARIANTS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_k_targets(backend, mode, dtype):
    """(N, K) targets: K log-probs from one softmax, with duplicates and ignored entries; the
    gradient of each of the K outputs reaches hidden, weight and bias."""
    check_case(backend, mode, 27, 40, 120, dtype, k=5, with_bias=True, softcap=8.0,
               ignore_frac=0.3, temperature=row_temperatures(27))
    check_case(backend, mode, 9, 16, 6, dtype, k=4, ignore_frac=0.2)  # many duplicate ids


@pytest.mark.parametrize("backend,mode", VARIANTS, ids=IDS)
@pytest.mark.parametrize("grads", [("logp",), ("ent", "lse")])
def test_k_targets_each_gradient(backend, mode, grads):
    check_case(backend, mode, 15, 24, 90, torch.float32, k=3, grads=grads)


@pytest.mark.parametrize("backend,mode", VARIANTS, ids=IDS)
def test_k_equal_to_one_is_the_plain_form(backend, mode):
    hidden, weight, _ = make_problem(12, 16, 70, torch.float32)
    targets = make_targets((12,), 70, 0.25)
    one = prefkern.linear_logprobs(hidden, weight, targets[:, None], backend=backend, mode=mode)
    plain = prefkern.linear_logprobs(hidden, weight, targets, backend=backend, mode=mode)
    assert one.shape == (12, 1) and torch.equal(one[:, 0], plain)


@pytest.mark.parametrize("backend,mode", VARIANTS, ids=IDS)
def test_no_targets(backend, mode):
    """targets=None: entropy and lse of every row, no dummy ids."""
    check_case(backend, mode, 21, 32, 150, torch.bfloat16, no_targets=True, with_bias=True,
               softcap=7.0)


@pytest.mark.parametrize("backend,mode", VARIANTS, ids=IDS)
def test_all_ignored(backend, mode):
    check_case(backend, mode, 9, 32, 100, torch.bfloat16, ignore_frac=1.0, with_bias=True)


def test_min_memory_deterministic():
    check_case("triton", "min_memory", 40, 64, 300, torch.float32, deterministic=True)


@pytest.mark.slow
@pytest.mark.parametrize("backend,mode", [("torch", "auto"), ("triton", "fast")],
                         ids=["torch", "triton-fast"])
def test_large_vocab(backend, mode):
    check_case(backend, mode, 4, 16, 70_000, torch.bfloat16)


def test_multi_slice_fast_mode(monkeypatch):
    from prefkern.ops import linear_sliced

    monkeypatch.setattr(linear_sliced, "SLICE_BYTES", 37 * 100 * 4)  # ~100-column slices
    check_case("triton", "fast", 37, 129, 1000, torch.float32, with_bias=True, softcap=5.0)


def test_min_memory_waves(monkeypatch):
    from prefkern._kernels import linear_logprobs_fused

    monkeypatch.setattr(linear_logprobs_fused, "SCRATCH_BYTES", 20 * 129 * 4)  # ~16-row waves
    check_case("triton", "min_memory", 37, 129, 300, torch.bfloat16, with_bias=True, softcap=5.0)

def test_gradcheck_head_options_float64():
    """Per-row temperature, logit scale, softcap and (N, K) targets together."""
    hidden = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(13, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[0, 12, 12], [-100, -100, -100], [5, -100, 2], [7, 7, 1],
                            [3, 4, 5]])
    temperature = torch.tensor([0.5, 1.0, 1.7, 0.9, 1.2], dtype=torch.float64)

    def fn(h, w, b):
        out = prefkern.linear_logprobs(h, w, targets, b, temperature=temperature, softcap=3.0,
                                       logit_scale=0.7, return_entropy=True, return_lse=True,
                                       backend="torch")
        return out.logprobs, out.entropy, out.lse

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_gradcheck_torch_float64():
    hidden = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(13, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 12, -100, 5, 7])

    def fn(h, w, b):
        out = prefkern.linear_logprobs(h, w, targets, b, temperature=0.8, softcap=3.0,
                                       return_entropy=True, return_lse=True, backend="torch")
        return out.logprobs, out.entropy, out.lse

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_frozen_weight_and_no_grad():
    hidden, weight, _ = make_problem(8, 16, 50, torch.float32)
    targets = make_targets((8,), 50, 0.0)
    h = leaf(hidden)
    prefkern.linear_logprobs(h, weight, targets, backend="torch").sum().backward()
    assert h.grad is not None and weight.grad is None
    with torch.no_grad():
        out = prefkern.linear_logprobs(leaf(hidden), leaf(weight), targets, backend="torch")
    assert out.grad_fn is None


def test_leading_dims_and_output_fields():
    hidden, weight, _ = make_problem(12, 16, 50, torch.float32)
    targets = make_targets((12,), 50, 0.0)
    out = prefkern.linear_logprobs(hidden.view(3, 4, 16), weight, targets.view(3, 4),
                                   return_lse=True, backend="torch")
    assert out.entropy is None and out.lse.shape == (3, 4) and out.logprobs.shape == (3, 4)
    ref = linear_logprobs_ref(hidden.double(), weight.double(), targets, return_lse=True)
    torch.testing.assert_close(out.lse.view(-1).double(), ref.lse, rtol=1e-5, atol=1e-5)


def test_module_calls_the_function():
    hidden, weight, _ = make_problem(6, 16, 40, torch.float32)
    targets = make_targets((6,), 40, 0.0)
    module = prefkern.nn.LinearLogprobs(temperature=0.9, return_entropy=True, backend="torch")
    out = module(hidden, weight, targets)
    expected = prefkern.linear_logprobs(hidden, weight, targets, temperature=0.9,
                                        return_entropy=True, backend="torch")
    torch.testing.assert_close(out.logprobs, expected.logprobs)
    torch.testing.assert_close(out.entropy, expected.entropy)


class TestBadInput:
    def _args(self):
        return torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)

    def test_hidden_size_mismatch(self):
        h, _, t = self._args()
        with pytest.raises(ValueError, match="weight must be"):
            prefkern.linear_logprobs(h, torch.randn(10, 9), t)

    def test_dtype_mismatch(self):
        h, w, t = self._args()
        with pytest.raises(TypeError, match="must match hidden dtype"):
            prefkern.linear_logprobs(h, w.bfloat16(), t)

    def test_bias_shape(self):
        h, w, t = self._args()
        with pytest.raises(ValueError, match="bias must be"):
            prefkern.linear_logprobs(h, w, t, torch.zeros(9))

    def test_targets_range(self):
        h, w, _ = self._args()
        with pytest.raises(ValueError, match="targets must be in"):
            prefkern.linear_logprobs(h, w, torch.tensor([0, 10, 1, 2]))

    def test_targets_shape(self):
        h, w, _ = self._args()
        with pytest.raises(ValueError, match="targets must have shape"):
            prefkern.linear_logprobs(h, w, torch.zeros(5, dtype=torch.long))
        with pytest.raises(ValueError, match="K >= 1"):
            prefkern.linear_logprobs(h, w, torch.zeros(4, 0, dtype=torch.long))

    def test_no_targets_needs_an_output(self):
        h, w, _ = self._args()
        with pytest.raises(ValueError, match="targets=None"):
            prefkern.linear_logprobs(h, w, None)

    def test_temperature_tensor(self):
        h, w, t = self._args()
        with pytest.raises(ValueError, match="one value per row"):
            prefkern.linear_logprobs(h, w, t, temperature=torch.ones(3))
        with pytest.raises(ValueError, match="takes no gradient"):
            prefkern.linear_logprobs(h, w, t, temperature=torch.ones(4, requires_grad=True))
        with pytest.raises(ValueError, match="temperature must be > 0"):
            prefkern.linear_logprobs(h, w, t, temperature=0.0)

    def test_logit_scale(self):
        h, w, t = self._args()
        with pytest.raises(ValueError, match="logit_scale must be > 0"):
            prefkern.linear_logprobs(h, w, t, logit_scale=-1.0)

    def test_bad_mode(self):
        h, w, t = self._args()
        with pytest.raises(ValueError, match="mode must be"):
            prefkern.linear_logprobs(h, w, t, mode="turbo")

    def test_cuda_backend_not_implemented(self):
        h, w, t = self._args()
        with pytest.raises(prefkern.BackendUnavailable, match="no 'cuda' backend"):
            prefkern.linear_logprobs(h, w, t, backend="cuda")


# ------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("backend,mode", VARIANTS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,h,v", [(37, 129, 1000), (512, 1024, 32_000), (256, 512, 128_256)])
def test_gpu(backend, mode, dtype, n, h, v):
    check_case(backend, mode, n, h, v, dtype, device="cuda", with_bias=True, temperature=0.7)


@pytest.mark.gpu
@pytest.mark.parametrize("backend,mode", VARIANTS, ids=IDS)
def test_gpu_head_options(backend, mode):
    """Per-row temperature, logit scale, softcap, (N, K) targets and targets=None."""
    check_case(backend, mode, 300, 512, 32_000, torch.bfloat16, device="cuda", with_bias=True,
               softcap=30.0, logit_scale=0.0625, temperature=row_temperatures(300, "cuda"), k=8)
    check_case(backend, mode, 128, 256, 4099, torch.float16, device="cuda", no_targets=True,
               temperature=0.7)


@pytest.mark.gpu
@pytest.mark.parametrize("backend,mode", VARIANTS, ids=IDS)
def test_gpu_softcap_extreme(backend, mode):
    check_case(backend, mode, 128, 256, 4099, torch.bfloat16, device="cuda", softcap=30.0)
    check_case(backend, mode, 128, 256, 4099, torch.bfloat16, device="cuda", kind="extreme")



@pytest.mark.parametrize("backend,mode", VARIANTS, ids=IDS)
def test_empty_batch(backend, mode):
    hidden = torch.zeros(0, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    bias = torch.randn(40, requires_grad=True)
    out = prefkern.linear_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long), bias,
                                   return_entropy=True, backend=backend, mode=mode)
    (out.logprobs.sum() + out.entropy.sum()).backward()
    assert out.logprobs.shape == (0,)
    assert (weight.grad == 0).all() and (bias.grad == 0).all() and hidden.grad.shape == (0, 16)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["fast", "min_memory"])
def test_gpu_never_materializes_logits(mode):
    """Peak extra memory of fwd+bwd stays far below one bf16 copy of the (N, V) logits."""
    n, h, v = 4096, 1024, 128_256
    hidden, weight, _ = make_problem(n, h, v, torch.bfloat16, "cuda")
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    targets = make_targets((n,), v, 0.0, "cuda")
    grads_bytes = (hidden.numel() + weight.numel()) * 2
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    prefkern.linear_logprobs(hidden, weight, targets, mode=mode).sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before - grads_bytes
    assert extra < 0.25 * n * v * 2, f"{mode}: {extra / 2**30:.3f} GiB extra"
    if mode == "min_memory":  # a 32 MiB scratch and the split statistics, whatever N and V
        assert extra <= 0.05 * 2**30, f"{extra / 2**30:.3f} GiB extra"


def test_all_paths_compute_the_same_function():
    """One numerics contract: on bf16 inputs with |z| up to ~30, torch, fast and min_memory
    agree on logp, entropy and lse to fp32 accuracy (rounding logits to bf16 moves them ~0.06)."""
    gen = torch.Generator().manual_seed(3)
    n, h, v = 48, 128, 2000
    hidden = torch.randn(n, h, generator=gen).bfloat16()
    weight = (torch.randn(v, h, generator=gen) * (10.0 / h**0.5)).bfloat16()
    targets = make_targets((n,), v, 0.25)
    z = hidden.float() @ weight.float().T
    assert 25 < z.abs().max() < 80
    outs = {f"{b}-{m}": prefkern.linear_logprobs(hidden, weight, targets, backend=b, mode=m,
                                                 return_entropy=True, return_lse=True)
            for b, m in VARIANTS}
    first_name, first = next(iter(outs.items()))
    for name, out in outs.items():
        for field in ("logprobs", "entropy", "lse"):
            diff = (getattr(out, field) - getattr(first, field)).abs().max().item()
            assert diff <= 1e-4, f"{name} vs {first_name}: {field} differs by {diff:.2e}"


@pytest.mark.parametrize("backend,mode", VARIANTS, ids=IDS)
@pytest.mark.parametrize("k", [None, 3])
def test_skipping_ignored_rows_changes_nothing(backend, mode, k):
    """Gathering the valid rows gives the results of computing every row, for the outputs and
    every gradient: to one step of the dtype (the BLAS may sum another row count in another
    order; torch and fast mode). min_memory adapts its vocab and token splits to the row
    count, so its sums run in another order: equal to rounding."""
    hidden, weight, bias = make_problem(40, 32, 300, torch.bfloat16, with_bias=True)
    targets = make_targets((40,) if k is None else (40, k), 300, 0.5)
    temperature = row_temperatures(40)
    results = []
    for skip in (False, True):
        h, w, b = leaf(hidden), leaf(weight), leaf(bias)
        out = prefkern.linear_logprobs(h, w, targets, b, temperature=temperature, softcap=12.0,
                                       return_entropy=True, return_lse=True, skip_ignored=skip,
                                       backend=backend, mode=mode)
        loss = (out.logprobs.sum() + out.entropy.square().sum() + out.lse.sum())
        loss.backward()
        results.append((*out, h.grad, w.grad, b.grad))
    for name, a, b in zip(NAMES, *results, strict=True):
        if mode == "min_memory":
            tol = 1e-5 if a.dtype == torch.float32 else 2**-7
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())
        else:
            assert_equal_to_rounding(a, b, name)


def test_skipping_is_the_cpu_default_and_never_traced(monkeypatch):
    from prefkern.ops import linear_logprobs as module

    assert module._skips(None, torch.device("cpu"))
    assert not module._skips(None, torch.device("cuda"))
    assert module._skips(True, torch.device("cuda"))  # asked for, outside graph capture
    assert not module._skips(False, torch.device("cpu"))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not module._skips(True, torch.device("cpu"))


@pytest.mark.parametrize("backend,mode", VARIANTS, ids=IDS)
def test_no_targets_whatever_the_ignore_index(backend, mode):
    """targets=None counts every row, also with ignore_index=0 (a common pad id)."""
    hidden, weight, _ = make_problem(6, 16, 40, torch.float32)
    outs = [prefkern.linear_logprobs(hidden, weight, None, ignore_index=ignore, return_lse=True,
                                     return_entropy=True, backend=backend, mode=mode)
            for ignore in (-100, 0)]
    assert torch.equal(outs[0].lse, outs[1].lse) and (outs[1].lse != 0).all()
    assert torch.equal(outs[0].entropy, outs[1].entropy)


def test_zero_dim_temperature_tensor_is_one_for_every_row():
    hidden, weight, _ = make_problem(6, 16, 40, torch.float32)
    targets = make_targets((2, 3), 40, 0.0)
    got = prefkern.linear_logprobs(hidden.view(2, 3, 16), weight, targets,
                                   temperature=torch.tensor(0.75), backend="torch")
    want = prefkern.linear_logprobs(hidden.view(2, 3, 16), weight, targets, temperature=0.75,
                                    backend="torch")
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("backend,mode", VARIANTS, ids=IDS)
def test_gpu_deterministic_with_k_targets(backend, mode):
    """deterministic=True stays bitwise repeatable with (N, K) targets (the sparse dW term is
    accumulated without atomics then)."""
    hidden, weight, bias = make_problem(512, 256, 4099, torch.bfloat16, "cuda", with_bias=True)
    targets = make_targets((512, 16), 50, 0.1, "cuda")  # few ids: many duplicates
    runs = []
    for _ in range(2):
        h, w, b = leaf(hidden), leaf(weight), leaf(bias)
        out = prefkern.linear_logprobs(h, w, targets, b, deterministic=True, backend=backend,
                                       mode=mode)
        out.sum().backward()
        runs.append((out, h.grad, w.grad, b.grad))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
