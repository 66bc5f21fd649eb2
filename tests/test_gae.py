"""prefkern.gae against the float64 loop of prefkern.reference.gae_ref.

The comparison rule (tests/compare.py): ref = gae_ref in float64, base = verl's loop over time
(gae_loop_over_time) on the test-dtype inputs. Default semantics mirror verl's
compute_gae_advantage_return and masked_whiten at volcengine/verl commit
012be9d9dcb7c38499f23616142870d2682757fc (verl/trainer/ppo/core_algos.py).
"""

from __future__ import annotations

import pytest
import torch
from compare import assert_rule

import prefkern.ops.gae as gae_ops
from prefkern.dispatch import BackendUnavailable
from prefkern.ops.gae import gae
from prefkern.reference.advantages import gae_loop_over_time, gae_ref, masked_whiten_ref

CPU_BACKENDS = ["torch", "triton"]


def make_batch(lengths, seq_len, dtype=torch.float32, hole_frac=0.2, device="cpu"):
    """Ragged (B, T) rewards/values/mask: row i has lengths[i] response tokens, ~hole_frac of
    them masked out mid-sequence (observation tokens), padding after."""
    n = len(lengths)
    rewards = torch.randn(n, seq_len, device=device)
    values = torch.randn(n, seq_len, device=device)
    bounds = torch.tensor(lengths, device=device)
    inside = torch.arange(seq_len, device=device)[None] < bounds[:, None]
    holes = torch.rand(n, seq_len, device=device) < hole_frac
    mask = inside & ~holes
    # keep each sequence's last token valid (holes are mid-sequence)
    mask[torch.arange(n, device=device), (bounds - 1).clamp(min=0)] |= bounds > 0
    return rewards.to(dtype), values.to(dtype), mask


def pack(mask, *tensors):
    """(B, T) tensors -> flat (N,) of the first lengths[i] tokens of each row, + cu_seqlens.
    Row lengths are taken from the mask's last valid token."""
    n, seq_len = mask.shape
    idx = torch.arange(seq_len, device=mask.device)
    lengths = (torch.where(mask, idx, -1).amax(-1) + 1)
    keep = idx[None] < lengths[:, None]
    cu = torch.zeros(n + 1, dtype=torch.int64, device=mask.device)
    cu[1:] = lengths.cumsum(0)
    return cu, keep, [t[keep] for t in tensors]


def run_rule(rewards, values, mask, backend, **kw):
    out = gae(rewards, values, mask, backend=backend, **kw)
    ref = gae_ref(rewards.double(), values.double(), mask, **_as64(kw))
    base = gae_loop_over_time(rewards, values, mask, **kw)
    for name, o, r, b in zip(("advantages", "returns"), out, ref, base, strict=True):
        assert o.dtype == (torch.float64 if rewards.dtype == torch.float64 else torch.float32)
        assert_rule(o, r, b, name)
    return out


def _as64(kw):
    return {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in kw.items()}


LENGTHS = [37, 0, 1, 20, 36, 5]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", [
    {}, {"gamma": 0.99, "lam": 0.95}, {"gamma": 1.0, "lam": 1.0},
    {"lam_critic": 1.0}, {"gamma": 0.9, "lam": 0.8, "lam_critic": 0.6},
], ids=["default", "g.99", "g1l1", "critic1", "critic.6"])
def test_matches_reference_ragged_with_holes(backend, dtype, options):
    rewards, values, mask = make_batch(LENGTHS, 37, dtype)
    run_rule(rewards, values, mask, backend, **options)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bootstrap", [False, True])
def test_truncated_matches_reference(backend, bootstrap):
    rewards, values, mask = make_batch(LENGTHS, 37)
    truncated = torch.tensor([True, True, True, False, True, False])
    kw = {"gamma": 0.97, "lam": 0.9, "truncated": truncated, "lam_critic": 0.5}
    if bootstrap:
        kw["bootstrap"] = torch.randn(len(LENGTHS))
    run_rule(rewards, values, mask, backend, **kw)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_per_token_gamma(backend):
    rewards, values, mask = make_batch(LENGTHS, 37)
    gamma = torch.rand(len(LENGTHS), 37)
    run_rule(rewards, values, mask, backend, gamma=gamma, lam=0.9,
             truncated=torch.tensor([1, 0, 1, 0, 1, 1]).bool())


def test_float64_on_torch_backend():
    rewards, values, mask = make_batch(LENGTHS, 37, torch.float64)
    run_rule(rewards, values, mask, "torch", gamma=0.99, lam=0.95)
    with pytest.raises(BackendUnavailable, match="no 'triton' backend"):
        gae(rewards, values, mask, backend="triton")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_verl_semantics_by_hand(backend):
    """A masked hole carries A and the next value through; trailing padding gives A = 0 and
    returns = V (verl's loop, worked by hand)."""
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 9.0, 0.25, 9.0]])
    mask = torch.tensor([[1, 0, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0, backend=backend)
    # t=2: delta = 1 - 0.25; t=1 carries 0.75; t=0: delta = 0 + 0.25 - 0.5 -> A = 0.5
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.75, 0.75, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[1.0, 9.75, 1.0, 9.0]]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gamma_lam_one_is_reverse_cumsum(backend):
    rewards, values = torch.randn(3, 29), torch.randn(3, 29)
    adv, ret = gae(rewards, values, gamma=1.0, lam=1.0, backend=backend)
    suffix = rewards.flip(-1).cumsum(-1).flip(-1)
    torch.testing.assert_close(ret, suffix, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(adv, suffix - values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_truncated_vs_terminal_last_token(backend):
    """At the last valid token l: terminal A = r - V_l; truncated (EGAE default) A = r +
    (gamma - 1) V_l; truncated with bootstrap b: A = r + gamma b - V_l."""
    rewards, values, mask = make_batch([6, 6, 6], 8, hole_frac=0.0)
    gamma = 0.9
    boot = torch.tensor([0.0, 0.0, 2.5])
    truncated = torch.tensor([False, True, True])
    adv_default, _ = gae(rewards, values, mask, gamma=gamma, truncated=truncated,
                         backend=backend)
    adv_boot, _ = gae(rewards, values, mask, gamma=gamma, truncated=truncated, bootstrap=boot,
                      backend=backend)
    r, v = rewards[:, 5], values[:, 5]
    torch.testing.assert_close(adv_default[0, 5], r[0] - v[0])
    torch.testing.assert_close(adv_default[1, 5], r[1] + (gamma - 1) * v[1])
    torch.testing.assert_close(adv_boot[1, 5], r[1] - v[1])  # truncated, bootstrap 0
    torch.testing.assert_close(adv_boot[2, 5], r[2] + gamma * 2.5 - v[2])
    assert (adv_default[:, 6:] == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("truncated", [False, True])
def test_packed_equals_padded(backend, truncated):
    rewards, values, mask = make_batch(LENGTHS, 37)
    kw = {"gamma": 0.95, "lam": 0.9, "lam_critic": 0.7}
    if truncated:
        kw["truncated"] = torch.tensor([1, 1, 0, 1, 0, 1]).bool()
    cu, keep, (r_p, v_p, m_p) = pack(mask, rewards, values, mask)
    packed = gae(r_p, v_p, m_p, cu_seqlens=cu, backend=backend, **kw)
    ref = gae_ref(r_p.double(), v_p.double(), m_p, cu_seqlens=cu, **kw)
    padded_base = gae_loop_over_time(rewards, values, mask, **kw)
    padded = gae(rewards, values, mask, backend=backend, **kw)
    for name, o, r, b, p in zip(("advantages", "returns"), packed, ref, padded_base, padded,
                                strict=True):
        assert_rule(o, r, b[keep], name)
        assert_rule(p[keep], r, b[keep], name + " (padded)")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_lengths_zero_and_empty_batches(backend):
    for shape in [(0, 5), (3, 0), (0, 0)]:
        adv, ret = gae(torch.zeros(shape), torch.zeros(shape), backend=backend)
        assert adv.shape == ret.shape == shape
    mask = torch.zeros(2, 4, dtype=torch.bool)
    values = torch.randn(2, 4)
    adv, ret = gae(torch.randn(2, 4), values, mask, truncated=torch.tensor([True, False]),
                   backend=backend)
    assert (adv == 0).all()
    torch.testing.assert_close(ret, values)
    cu = torch.tensor([0, 0, 3, 3])
    adv, _ = gae(torch.randn(3), torch.randn(3), cu_seqlens=cu, backend=backend)
    assert adv.shape == (3,)


@pytest.mark.parametrize("lengths", [[16, 15, 17, 32, 48, 33, 1]], ids=["edges"])
@pytest.mark.parametrize("truncated", [False, True])
def test_triton_chunk_edges(lengths, truncated):
    """EOS exactly at a scan-chunk edge (16-token chunks) and at the window edge (T=48)."""
    from prefkern._kernels.gae import gae_scan

    rewards, values, mask = make_batch(lengths, 48, hole_frac=0.3)
    trunc = torch.ones(len(lengths), dtype=torch.bool) if truncated else None
    kw = {"gamma": 0.99, "lam": 0.95, "truncated": trunc}
    out = gae_scan(rewards, values, mask, gammas=None, block=16, lam_critic=0.9, **kw)
    ref = gae_ref(rewards.double(), values.double(), mask, lam_critic=0.9, **kw)
    base = gae_loop_over_time(rewards, values, mask, lam_critic=0.9, **kw)
    for o, r, b in zip(out, ref, base, strict=True):
        assert_rule(o, r, b, "chunked scan")
    cu, keep, (r_p, v_p, m_p) = pack(mask, rewards, values, mask)
    out_p = gae_scan(r_p, v_p, m_p, cu_seqlens=cu, block=16, lam_critic=0.9, **kw)
    for o, r, b in zip(out_p, ref, base, strict=True):
        assert_rule(o, r[keep], b[keep], "chunked packed scan")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_whitening(backend):
    rewards, values, mask = make_batch(LENGTHS, 37)
    raw = gae(rewards, values, mask, gamma=0.99, backend=backend)
    adv, ret = gae(rewards, values, mask, gamma=0.99, whiten=True, backend=backend)
    torch.testing.assert_close(ret, raw[1])  # returns are never whitened
    ref_adv, _ = gae_ref(rewards.double(), values.double(), mask, gamma=0.99, whiten=True)
    torch.testing.assert_close(adv.double(), ref_adv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(adv.double(), masked_whiten_ref(raw[0], mask), rtol=1e-5,
                               atol=1e-5)
    inside = adv[mask].double()
    assert abs(inside.mean().item()) < 1e-5
    assert abs(inside.var(unbiased=True).item() - 1.0) < 1e-4


def test_whitening_over_a_process_group(tmp_path):
    """The all-reduce path: with one rank the global statistics are the local ones."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        rewards, values, mask = make_batch(LENGTHS, 37)
        local, _ = gae(rewards, values, mask, whiten=True, backend="torch")
        grouped, _ = gae(rewards, values, mask, whiten=True, process_group=dist.group.WORLD,
                         backend="torch")
        torch.testing.assert_close(grouped, local)
    finally:
        dist.destroy_process_group()


def test_input_validation():
    r, v = torch.randn(2, 5), torch.randn(2, 5)
    with pytest.raises(ValueError, match="values shape"):
        gae(r, torch.randn(2, 4))
    with pytest.raises(ValueError, match="mask shape"):
        gae(r, v, torch.ones(2, 4))
    with pytest.raises(ValueError, match="pass truncated"):
        gae(r, v, bootstrap=torch.zeros(2))
    with pytest.raises(ValueError, match=r"truncated must be \(2,\)"):
        gae(r, v, truncated=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="packed"):
        gae(torch.randn(5), torch.randn(5))
    with pytest.raises(ValueError, match="non-decreasing"):
        gae(torch.randn(5), torch.randn(5), cu_seqlens=torch.tensor([0, 3, 2, 5]))
    with pytest.raises(ValueError, match="end at the number of tokens 5"):
        gae(torch.randn(5), torch.randn(5), cu_seqlens=torch.tensor([0, 3, 4]))
    with pytest.raises(TypeError, match="integer"):
        gae(torch.randn(5), torch.randn(5), cu_seqlens=torch.tensor([0.0, 5.0]))
    with pytest.raises(TypeError, match="rewards must have dtype"):
        gae(torch.ones(2, 5, dtype=torch.int64), v)
    with pytest.raises(ValueError, match="per-token gamma"):
        gae(r, v, gamma=torch.ones(2, 4))
    with pytest.raises(BackendUnavailable, match="CUDA tensors"):
        gae(r, v, backend="cuda")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compiles_fullgraph(backend):
    rewards, values, mask = make_batch(LENGTHS, 37)
    truncated = torch.tensor([1, 0, 1, 0, 1, 0]).bool()

    def fn(r, v):
        return gae(r, v, mask, gamma=0.9, truncated=truncated, lam_critic=1.0, whiten=True,
                   backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(rewards, values)
    for c, e in zip(compiled, fn(rewards, values), strict=True):
        torch.testing.assert_close(c, e)


# ------------------------------------------------------------------------------- GPU

GPU_BACKENDS = ["torch", "triton", "cuda"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 4096), (512, 300), (8, 20000)])
def test_gpu_matches_loop(backend, dtype, shape):
    n, seq_len = shape
    lengths = torch.randint(0, seq_len + 1, (n,)).tolist()
    lengths[0], lengths[-1] = seq_len, 1
    rewards, values, mask = make_batch(lengths, seq_len, dtype, device="cuda")
    truncated = torch.rand(n, device="cuda") < 0.5
    kw = {"gamma": 0.999, "lam": 0.95, "lam_critic": 1.0, "truncated": truncated}
    out = gae(rewards, values, mask, backend=backend, **kw)
    ref = gae_loop_over_time(rewards.double(), values.double(), mask, **kw)
    base = gae_loop_over_time(rewards, values, mask, **kw)
    for name, o, r, b in zip(("advantages", "returns"), out, ref, base, strict=True):
        assert_rule(o, r, b, name)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_packed_per_token_gamma_bootstrap(backend):
    lengths = torch.randint(0, 3000, (40,)).tolist()
    rewards, values, mask = make_batch(lengths, 3000, device="cuda")
    gamma = torch.rand(40, 3000, device="cuda") * 0.1 + 0.9
    cu, keep, (r_p, v_p, m_p, g_p) = pack(mask, rewards, values, mask, gamma)
    truncated = torch.rand(40, device="cuda") < 0.5
    boot = torch.randn(40, device="cuda")
    kw = {"lam": 0.95, "truncated": truncated, "bootstrap": boot}
    out = gae(r_p, v_p, m_p, gamma=g_p, cu_seqlens=cu, backend=backend, **kw)
    ref = gae_loop_over_time(rewards.double(), values.double(), mask, gamma=gamma.double(),
                             **_as64(kw))
    base = gae_loop_over_time(rewards, values, mask, gamma=gamma, **kw)
    for name, o, r, b in zip(("advantages", "returns"), out, ref, base, strict=True):
        assert_rule(o, r[keep], b[keep], name)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_no_host_sync(backend):
    rewards, values, mask = make_batch([100] * 8, 128, device="cuda")
    cu, _, (r_p, v_p, m_p) = pack(mask, rewards, values, mask)
    gae(r_p, v_p, m_p, cu_seqlens=cu, backend=backend)  # warm up: compile/load outside
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gae(rewards, values, mask, truncated=mask[:, 0], whiten=True, backend=backend)
        gae(r_p, v_p, m_p, cu_seqlens=cu, truncated=mask[:, 0], backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_auto_is_torch_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setitem(gae_ops._IMPLS, "torch",
                        lambda *a, **k: calls.append(1) or gae_ops.torch_gae(*a, **k))
    gae(torch.randn(2, 3), torch.randn(2, 3))
    assert calls == [1]
