"""linear_divergence's min_memory mode (fused Triton tiles, interpreter on CPU) against the
float64 references, and against the fast mode and the torch backend: one function for every
path."""

from __future__ import annotations

import pytest
import torch
from divergence_checks import KIND_IDS, KINDS, check_linear, heads

import prefkern

MIN = dict(backend="triton", mode="min_memory")


@pytest.mark.parametrize("kind,kw", KINDS, ids=KIND_IDS)
def test_kinds_bf16(kind, kw):
    check_linear("triton", 21, 40, 300, torch.bfloat16, kind, temperature=0.8,
                 mode="min_memory", **kw)


@pytest.mark.parametrize("kind,kw", KINDS, ids=KIND_IDS)
def test_reference_side_gradient_and_bias(kind, kw):
    check_linear("triton", 19, 24, 200, torch.float32, kind, ref_grad=True, with_bias=True,
                 mode="min_memory", **kw)


def test_head_options():
    """Per-row temperature, softcap, logit_scale, bias, fp16, a ragged V."""
    check_linear("triton", 17, 24, 130, torch.float32, "jsd", beta=0.7,
                 temperature=torch.rand(17) + 0.4, softcap=6.0, logit_scale=1.5,
                 with_bias=True, mode="min_memory")
    check_linear("triton", 16, 32, 96, torch.float16, "reverse_kl", temperature=1.3,
                 mode="min_memory")


@pytest.mark.parametrize("kind,kw", KINDS[:-1], ids=KIND_IDS[:-1])
def test_extreme_logits_and_all_ignored(kind, kw):
    check_linear("triton", 11, 16, 130, torch.float32, kind, ignore_frac=0.0, extreme=True,
                 mode="min_memory", **kw)
    out = check_linear("triton", 5, 16, 64, torch.float32, kind, ignore_frac=1.0,
                       mode="min_memory", **kw)
    assert all((t == 0).all() for t in out)


def test_waves_and_a_model_against_itself(monkeypatch):
    """Several gradient waves (a tiny scratch budget) with the reference taking a gradient;
    D = 0 between a model and itself."""
    from prefkern._kernels import linear_logprobs_fused

    monkeypatch.setattr(linear_logprobs_fused, "SCRATCH_BYTES", 20 * (40 + 43) * 4)
    check_linear("triton", 37, 40, 300, torch.bfloat16, "tv", ref_grad=True, with_bias=True,
                 mode="min_memory")
    hidden, weight = heads(20, 32, 150, torch.float32)
    for kind, kw in KINDS:
        same = prefkern.linear_divergence(hidden, weight, hidden, weight, kind=kind, **kw, **MIN)
        assert same.abs().max() < 1e-5, kind


def test_every_path_computes_the_same_function():
    """bf16 inputs with |z| up to ~30: min_memory, fast and torch agree on D and the target
    log-probs to fp32 accuracy and on every gradient to the rounding of its bf16 output.
    (alpha = -0.5 is left out: between such sharp heads its terms reach 1e9 and cancel.)"""
    gen = torch.Generator().manual_seed(5)
    n, h, v = 24, 64, 400
    hidden = torch.randn(n, h, generator=gen).bfloat16()
    weight = (torch.randn(v, h, generator=gen) * (10.0 / h**0.5)).bfloat16()
    ref_hidden = torch.randn(n, h, generator=gen).bfloat16()
    ref_weight = (torch.randn(v, h, generator=gen) * (8.0 / h**0.5)).bfloat16()
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[::5] = -100
    assert 20 < (hidden.float() @ weight.float().T).abs().max() < 80
    paths = {"torch": dict(backend="torch"), "fast": dict(backend="triton", mode="fast"),
             "min_memory": MIN}
    for kind, kw in KINDS[:-1]:
        results = {}
        for name, path in paths.items():
            leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, ref_weight)]
            out = prefkern.linear_divergence(leaves[0], leaves[1], ref_hidden, leaves[2],
                                             targets, kind=kind, return_logprobs=True,
                                             **kw, **path)
            (out.divergence.sum() + 0.3 * out.logprobs.sum()).backward()
            results[name] = [out.divergence, out.logprobs, *(t.grad for t in leaves)]
        for name, got in results.items():
            for field, a, b in zip(("D", "logp", "dh", "dW", "dW_ref"), got,
                                   results["torch"], strict=True):
                a, b = a.float(), b.float()
                tol = 1e-4 if field in ("D", "logp") else 2**-7
                diff = (a - b).abs().max().item()
                assert diff <= tol * (1 + b.abs().max().item()), \
                    f"{kind} {kw} {name} vs torch: {field} differs by {diff:.2e}"


@pytest.mark.parametrize("kind,kw", [("forward_kl", {}), ("reverse_kl", {}),
                                     ("alpha", {"alpha": 0.05}), ("alpha", {"alpha": 0.4})],
                         ids=["fkl", "rkl", "alpha0.05", "alpha0.4"])
def test_one_pass_sums_do_not_round_with_the_logits_offset(kind, kw):
    """Per-row logit offsets of +-100 change no probability; the one-pass sums are taken
    relative to the running maxima, so min_memory's error stays that of fast mode's
    log-softmax (a sum of raw logits would carry eps * 100: 20-50x fast mode's error)."""
    gen = torch.Generator().manual_seed(11)
    n, h, v = 16, 32, 200
    hidden, weight = torch.randn(n, h, generator=gen), torch.randn(v, h, generator=gen) * 0.5
    ref_hidden, ref_weight = torch.randn(n, h, generator=gen), torch.randn(v, h, generator=gen)
    hidden[:, 0] = ref_hidden[:, 0] = torch.rand(n, generator=gen) + 0.5
    weight[:, 0], ref_weight[:, 0] = 100.0, -100.0
    targets = torch.randint(0, v, (n,), generator=gen)
    want = prefkern.reference.linear_divergence_ref(
        hidden.double(), weight.double(), ref_hidden.double(), ref_weight.double(), targets,
        kind=kind, **kw).double()
    errors = {}
    for mode in ("fast", "min_memory"):
        h = hidden.clone().requires_grad_(True)
        d = prefkern.linear_divergence(h, weight, ref_hidden, ref_weight, targets, kind=kind,
                                       backend="triton", mode=mode, **kw)
        d.sum().backward()
        errors[mode] = ((d.double() - want).abs().max().item(), h.grad)
    h64 = hidden.double().requires_grad_(True)
    prefkern.reference.linear_divergence_ref(h64, weight.double(), ref_hidden.double(),
                                             ref_weight.double(), targets, kind=kind,
                                             **kw).sum().backward()
    dh_err = {mode: (g.double() - h64.grad).abs().max().item() for mode, (_, g) in errors.items()}
    assert errors["min_memory"][0] <= 4 * errors["fast"][0] + 1e-7, errors
    assert dh_err["min_memory"] <= 4 * dh_err["fast"] + 1e-7, dh_err


def test_non_contiguous_biases():
    """The fused kernels read biases at unit stride: strided ones are made contiguous."""
    hidden, weight = heads(9, 16, 64, torch.float32)
    ref_hidden, ref_weight = heads(9, 16, 64, torch.float32)
    targets = torch.randint(0, 64, (9,))
    results = []
    for strided in (False, True):
        pair = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
        pair.requires_grad_(True)
        bias, ref_bias = pair.unbind(1) if strided else pair.detach().clone().unbind(1)
        if not strided:
            bias = bias.contiguous().requires_grad_(True)
        assert bias.is_contiguous() != strided
        d = prefkern.linear_divergence(hidden, weight, ref_hidden, ref_weight, targets,
                                       bias=bias, ref_bias=ref_bias, kind="jsd", **MIN)
        logp = prefkern.linear_logprobs(hidden, weight, targets, bias, mode="min_memory",
                                        backend="triton")
        (d.sum() + logp.sum()).backward()
        results.append((d, logp, pair.grad[:, 0] if strided else bias.grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("needs", ["reference_only", "policy_bias_only", "weights_only"])
def test_reference_head_options_and_partial_gradients(needs):
    """The reference's bias and softcap, and gradients to a subset of the tensors, on every
    path against the float64 reference."""
    gen = torch.Generator().manual_seed(2)
    n, h, v = 13, 24, 150
    tensors = dict(hidden=torch.randn(n, h, generator=gen),
                   weight=torch.randn(v, h, generator=gen) * 0.4,
                   bias=torch.randn(v, generator=gen),
                   ref_hidden=torch.randn(n, h + 5, generator=gen),
                   ref_weight=torch.randn(v, h + 5, generator=gen) * 0.4,
                   ref_bias=torch.randn(v, generator=gen))
    grad_of = {"reference_only": ("ref_hidden", "ref_weight", "ref_bias"),
               "policy_bias_only": ("bias",), "weights_only": ("weight", "ref_weight")}[needs]
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[::4] = -100
    g_div, g_logp = torch.randn(n, generator=gen), torch.randn(n, generator=gen)

    def run(fn, dtype, **path):
        leaves = {k: t.to(dtype).clone().requires_grad_(k in grad_of)
                  for k, t in tensors.items()}
        out = fn(leaves["hidden"], leaves["weight"], leaves["ref_hidden"], leaves["ref_weight"],
                 targets, bias=leaves["bias"], ref_bias=leaves["ref_bias"], kind="jsd",
                 beta=0.3, temperature=0.9, softcap=4.0, ref_softcap=3.0,
                 return_logprobs=True, **path)
        ((out[0] * g_div.to(dtype)).sum() + (out[1] * g_logp.to(dtype)).sum()).backward()
        return [out[0], out[1]] + [leaves[k].grad for k in grad_of]

    want = run(prefkern.reference.linear_divergence_ref, torch.float64)
    for path in (dict(backend="torch"), dict(backend="triton", mode="fast"), MIN):
        got = run(prefkern.linear_divergence, torch.float32, **path)
        for name, a, b in zip(("D", "logp", *grad_of), got, want, strict=True):
            assert a is not None, f"{path} {name}: no gradient"
            err = (a.double() - b).abs().max().item()
            assert err <= 1e-5 * (1 + b.abs().max().item()), f"{path} {name}: {err:.2e}"


class _RecordLaunches:
    """Wraps a Triton kernel: records each launch's ATOMIC flag, then launches."""

    def __init__(self, kernel, seen: list):
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.seen.append(kwargs["ATOMIC"])
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("deterministic", [False, True])
def test_deterministic_launches_no_atomics(deterministic, monkeypatch):
    """deterministic=True: one program per gradient block (no atomics), same values."""
    from prefkern._kernels import divergence_fused

    seen = []
    for name in ("_fused_divergence_dh_kernel", "_fused_divergence_dw_kernel"):
        monkeypatch.setattr(divergence_fused, name,
                            _RecordLaunches(getattr(divergence_fused, name), seen))
    out = check_linear("triton", 40, 24, 300, torch.float32, "reverse_kl", ref_grad=True,
                       mode="min_memory", deterministic=deterministic)
    assert seen and any(seen) != deterministic, seen
    assert out[0].isfinite().all()


def test_the_checks_fail_a_slightly_wrong_min_memory_path(monkeypatch):
    """The merged forward algebra and the fused backward are each seen by the checks."""
    from prefkern._kernels import divergence_fused

    from prefkern.ops import divergence_min_memory

    right_values = divergence_min_memory._row_values

    def shifted(part, div):
        d, *rest = right_values(part, div)
        return (d + 1e-3, *rest)

    monkeypatch.setattr(divergence_min_memory, "_row_values", shifted)
    with pytest.raises(AssertionError, match="divergence"):
        check_linear("triton", 9, 16, 64, torch.float32, "forward_kl", mode="min_memory")
    monkeypatch.undo()

    right_bwd = divergence_fused.divergence_bwd

    def scaled(*args, **kwargs):
        grads = right_bwd(*args, **kwargs)
        grads[1] = grads[1] * (1 + 1e-3)
        return grads

    monkeypatch.setattr(divergence_fused, "divergence_bwd", scaled)
    with pytest.raises(AssertionError, match="dweight"):
        check_linear("triton", 9, 16, 64, torch.float32, "reverse_kl", mode="min_memory")


def test_errors():
    h, w = heads(4, 8, 20, torch.float32)
    hr, wr = heads(4, 8, 20, torch.float32)
    with pytest.raises(ValueError, match="one reference head"):
        prefkern.linear_divergence(h, w, [(hr, wr, 0.5), (h, w, 0.5)], None, **MIN)
    with pytest.raises(ValueError, match="process_group"):
        prefkern.linear_divergence(h, w, hr, wr, process_group=object(), **MIN)
    with pytest.raises(ValueError, match="mode must be one of"):
        prefkern.linear_divergence(h, w, hr, wr, mode="tiny")
    with pytest.raises(TypeError, match="dtype"):
        prefkern.linear_divergence(h, w, hr.double(), wr.double(), **MIN)


@pytest.mark.gpu
def test_gpu_min_memory_holds_no_logits_buffer():
    """Peak memory above the inputs and the gradients of a fwd+bwd step: min_memory holds only
    its fp32 gradient scratches (<= 32 MiB a wave): at most 0.05 GiB, a small fraction of one
    bf16 copy of the (N, V) logits and below fast mode's slices."""
    n, h, v = 4096, 1024, 128_256
    hidden, weight = (t.cuda() for t in heads(n, h, v, torch.bfloat16))
    ref_hidden, ref_weight = (t.cuda() for t in heads(n, h, v, torch.bfloat16))
    targets = torch.randint(0, v, (n,), device="cuda")
    extra = {}
    for mode in ("fast", "min_memory"):
        hid, wt = (t.detach().clone().requires_grad_(True) for t in (hidden, weight))
        grads_bytes = (hid.numel() + wt.numel()) * 2
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        prefkern.linear_divergence(hid, wt, ref_hidden, ref_weight, targets, kind="jsd",
                                   backend="triton", mode=mode).sum().backward()
        torch.cuda.synchronize()
        extra[mode] = torch.cuda.max_memory_allocated() - before - grads_bytes
    assert extra["min_memory"] < 0.1 * n * v * 2, extra
    assert extra["min_memory"] <= 0.05 * 2**30, extra
    assert extra["min_memory"] < extra["fast"], extra


@pytest.mark.gpu
def test_gpu_deterministic_is_bitwise_stable():
    hidden, weight = (t.cuda() for t in heads(1000, 256, 32000, torch.bfloat16))
    ref_hidden, ref_weight = (t.cuda() for t in heads(1000, 256, 32000, torch.bfloat16))
    targets = torch.randint(0, 32000, (1000,), device="cuda")
    runs = []
    for _ in range(2):
        hid, wt = (t.detach().clone().requires_grad_(True) for t in (hidden, weight))
        prefkern.linear_divergence(hid, wt, ref_hidden, ref_weight, targets, kind="jsd",
                                   deterministic=True, **MIN).sum().backward()
        runs.append((hid.grad, wt.grad))
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
