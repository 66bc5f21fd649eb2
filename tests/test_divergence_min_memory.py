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
