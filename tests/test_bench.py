"""The main job end to end on CPU (tiny shapes), and the harness's correctness check.
No timing asserts: a benchmark is not a test."""

from __future__ import annotations

import csv
import json

import pytest
import torch

import prefkern
from prefkern.bench.core import Case, Problem, run_problem, scalar_loss_step
from prefkern.bench.inputs import logit_stats, peaked_problem
from prefkern.bench.linear_providers import as_step, providers
from prefkern.bench.reference_check import (
    linear_logprobs_reference,
    logprobs_from_logits_reference,
)
from prefkern.bench.results import table
from prefkern.bench.suites import all_suites
from prefkern.cli import main
from prefkern.reference import linear_logprobs_ref
from prefkern.testing import rule_error

CPU = torch.device("cpu")


def test_bench_cli_tiny(tmp_path, capsys):
    assert main(["bench", "--shapes", "tiny", "--quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "provider" in printed and "prefkern_torch" in printed and "torch_eager" in printed
    (json_path,) = tmp_path.glob("*_all_tiny.json")
    data = json.loads(json_path.read_text())
    assert {"device", "torch", "triton", "git_commit", "date"} <= set(data["meta"])
    rows = data["rows"]
    assert {r["op"] for r in rows} == {name for name, suite in all_suites().items()
                                       if suite.sweep is None}
    timed = [r for r in rows if r.get("ms_p50") is not None]
    # prefkern and the baselines pass the gate; a peer may not (TRL's selective_log_softmax
    # takes the log-softmax of bf16 logits in bf16: MISMATCH on bf16 rows), never an error
    # eager-style providers on bf16 linear heads run bf16 GEMMs that round the logits: the
    # numerics contract's check must catch them
    rounding = [r for r in timed if r["op"] == "linear_logprobs" and r["dtype"] == "bfloat16"
                and r["provider"] in ("torch_eager", "torch_compile_chunked")]
    assert rounding and all(r["status"] == "MISMATCH" for r in rounding), rounding
    ours = [r for r in timed if not r["provider"].startswith(("trl_", "torch_linear_cross"))
            and r not in rounding]
    assert ours and all(r["status"] == "ok" for r in ours), [
        (r["op"], r["provider"], r["status"]) for r in ours if r["status"] != "ok"]
    assert all(r["status"] in ("ok", "MISMATCH") for r in timed), [
        (r["op"], r["provider"], r["status"]) for r in timed
        if r["status"] not in ("ok", "MISMATCH")]
    assert all(r["err_over_bound"] > 1 for r in timed if r["status"] == "MISMATCH")
    trl_rows = {(r["dtype"], r["status"]) for r in timed
                if r["provider"] == "trl_selective_log_softmax"}
    if trl_rows:  # trl installed (the test extra): fp32 passes, bf16 is caught
        assert trl_rows == {("float32", "ok"), ("bfloat16", "MISMATCH")}, trl_rows
    logits_rows = [r for r in timed if r["op"] == "logprobs_from_logits"]
    assert {(r["mode"], r["dtype"]) for r in logits_rows} == {
        (m, d) for m in ("fwd", "fwd+bwd") for d in ("bfloat16", "float32")}
    assert {"torch_eager", "prefkern_torch", "copy"} <= {r["provider"] for r in logits_rows}
    # peak memory is measured on CPU too (the profiler's memory timeline)
    assert all(r["GBps"] > 0 and r["peak_extra_GiB"] is not None and r["peak_extra_GiB"] >= 0
               for r in logits_rows)
    # prefkern's torch backend was checked against the fp64 reference on outputs and gradients
    checked = [r for r in logits_rows if r["provider"] == "prefkern_torch"]
    assert len(checked) == 8 and all(r["err_over_bound"] <= 1.0 for r in checked)  # +entropy
    assert all(r["max_rel_err"] < 1e-4 for r in checked if r["dtype"] == "float32")
    gated = [r for r in timed if r["op"] != "gae"
             and not r["provider"].startswith(("copy", "floor"))
             and r["status"] == "ok"]
    assert gated and all(r["err_over_bound"] <= 1.0 and r["check"] for r in gated)
    assert {"logprobs=", "dlogits=", "dhidden=", "dweight=", "entropy="} <= {
        c.split("=")[0] + "=" for r in gated for c in r["check"].split()}
    assert data["inputs"] and all("logit_std" in i for i in data["inputs"])
    # the preference and policy suites ignore their prompts (a quarter of each row) and ends
    assert all(0.05 < i["ignored_frac"] < 0.15 for i in data["inputs"]
               if i["op"] not in ("gae", "preference", "policy"))
    (csv_path,) = tmp_path.glob("*_all_tiny.csv")
    with csv_path.open() as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows)
    assert {"op", "provider", "mode", "shape", "ms_p50", "ms_p20", "ms_p80", "peak_extra_GiB",
            "GBps", "TFLOPs", "ratio_to_baseline", "device", "torch", "triton", "git_commit",
            "date"} <= set(csv_rows[0])


def test_one_suite_and_list(tmp_path, capsys):
    assert main(["bench", "--list"]) == 0
    assert "logprobs_from_logits" in capsys.readouterr().out
    args = ["bench", "--suite", "logprobs_from_logits", "--shapes", "tiny", "--quick",
            "--no-check", "--out", str(tmp_path)]
    assert main(args) == 0
    (json_path,) = tmp_path.glob("*_logprobs_from_logits_tiny.json")
    assert {r["op"] for r in json.loads(json_path.read_text())["rows"]} == {
        "logprobs_from_logits"}


def test_sweeps_run_only_when_named_and_are_plotted_against_the_swept_size(tmp_path, capsys):
    assert main(["bench", "--list"]) == 0
    listed = capsys.readouterr().out
    assert "sweep_tokens" in listed and "only when named" in listed
    args = ["bench", "--suite", "sweep_tokens", "--suite", "sweep_vocab", "--shapes", "tiny",
            "--quick", "--out", str(tmp_path)]
    assert main(args) == 0
    (json_path,) = tmp_path.glob("*_sweep_tokens+sweep_vocab_tiny.json")
    rows = json.loads(json_path.read_text())["rows"]
    eager = [r for r in rows if r["provider"] == "torch_eager"]
    assert sorted((r["op"], r["sweep_axis"], r["N"], r["V"]) for r in eager) == [
        ("sweep_tokens", "N", 16, 1000), ("sweep_tokens", "N", 32, 1000),
        ("sweep_vocab", "V", 32, 500), ("sweep_vocab", "V", 32, 1000)]
    mine = [r for r in rows if r["provider"] == "prefkern_torch"]
    assert len(mine) == 4 and all(r["status"] == "ok" and r["peak_extra_GiB"] is not None
                                  for r in mine)
    pytest.importorskip("matplotlib")
    assert list(tmp_path.glob("*_sweep.png")) and not list(tmp_path.glob("*_tiny.png"))


def _problem(cases, mode="fwd"):
    return Problem("n=10", mode, "fp32", cases, "base")


def test_mismatch_is_flagged_on_outputs():
    x = torch.randn(10)
    cases = [Case("wrong", lambda: x + 1, 1.0, "GB/s"), Case("base", lambda: x, 1.0, "GB/s"),
             Case("same", lambda: x.clone(), 1.0, "GB/s"), Case("copy", lambda: None, 2.0, "GB/s")]
    rows = run_problem("demo", _problem(cases), CPU, quick=True)
    status = {r["provider"]: r["status"] for r in rows}
    assert status == {"base": "ok", "wrong": "MISMATCH", "same": "ok", "copy": "ok"}
    assert rows[0]["provider"] == "base"  # the baseline runs first
    assert all(r["ratio_to_baseline"] > 0 and r["pct_of_copy"] > 0 for r in rows)
    assert "MISMATCH" in table(rows)


def test_mismatch_is_flagged_on_gradients():
    w = torch.randn(10, requires_grad=True)

    def step(scale):
        def fn():
            out = (w * w).sum()
            (out * scale).backward()
            return out.detach()

        return fn

    cases = [Case("base", step(1.0), 1.0, "GB/s", (w,)), Case("bad", step(2.0), 1.0, "GB/s", (w,))]
    rows = run_problem("demo", _problem(cases, "fwd+bwd"), CPU, quick=True)
    assert [r["status"] for r in rows] == ["ok", "MISMATCH"]
    assert w.grad is None


def test_failing_provider_gives_an_error_row():
    def boom():
        raise RuntimeError("peer exploded")

    cases = [Case("base", lambda: torch.ones(3), 1.0, "GB/s"), Case("peer", boom, 1.0, "GB/s")]
    rows = run_problem("demo", _problem(cases), CPU, quick=True)
    assert rows[1]["status"].startswith("error: RuntimeError: peer exploded")


def test_peaked_inputs_are_realistic():
    hidden, weight, targets = peaked_problem(128, 512, 8000, torch.float32)
    stats = logit_stats(hidden, weight)
    assert 2.0 < stats["logit_std"] < 5.0
    assert 0.1 < stats["mean_max_p"] < 0.7
    assert targets.min() >= 0 and targets.max() < 8000


def test_unknown_suite_is_an_error():
    assert main(["bench", "--suite", "nope"]) == 2


def test_info_prints_backends(capsys):
    assert main(["info", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "backend torch: available" in printed and "torch:" in printed


@pytest.mark.gpu
def test_bench_cli_gpu_tiny(tmp_path):
    assert main(["bench", "--shapes", "tiny", "--quick", "--out", str(tmp_path)]) == 0
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    timed = [r for r in data["rows"] if r.get("ms_p50") is not None]
    bad = [(r["op"], r["provider"], r["status"]) for r in timed
           if r["provider"].startswith("prefkern") and r["status"] != "ok"]
    assert not bad, bad
    assert all(r["peak_extra_GiB"] is not None for r in timed)


# -- the gate: every element against the fp64 spec, under prefkern.testing's rule ----------

T_IGNORE = -100


def _masked(logp, targets):
    return logp.masked_fill(targets == T_IGNORE, 0.0)


def _eager_logp(x, targets, temperature=1.0):
    return _masked(torch.log_softmax(x.float() / temperature, -1)
                   .gather(-1, targets.clamp_min(0)[:, None])[:, 0], targets)


def _logits_rows(fakes: dict, dtype=torch.float32, mode="fwd+bwd", temperature=1.0,
                 n=64, v=1000) -> dict:
    """Run ``fakes`` ({name: (x, targets) -> logp, or (fn, upstream scale)}) as the providers
    of one logprobs_from_logits problem (peaked logits, 10% ignored) -> {name: row}."""
    hidden, weight, targets = peaked_problem(n, 64, v, torch.float32, ignore_frac=0.1)
    logits = (hidden @ weight.T).to(dtype)
    g = torch.randn(n, generator=torch.Generator().manual_seed(1))
    grad = mode != "fwd"
    cases = []
    for name, fake in fakes.items():
        fn, scale = fake if isinstance(fake, tuple) else (fake, 1.0)
        x = logits.detach().clone().requires_grad_(grad)

        def step(fn=fn, x=x, scale=scale):
            with torch.set_grad_enabled(grad):
                logp = fn(x, targets)
                if grad:
                    logp.backward(g * scale)
            return logp.detach(), None

        cases.append(Case(name, step, 1.0, "GB/s", (x,) if grad else ()))
    reference = logprobs_from_logits_reference(logits, targets, temperature=temperature,
                                               upstream={"logprobs": g} if grad else None)
    problem = Problem("tiny", mode, str(dtype), cases, next(iter(fakes)), reference=reference)
    return {r["provider"]: r for r in run_problem("demo", problem, CPU, quick=True)}


def _status(rows: dict) -> dict:
    return {name: r["status"] for name, r in rows.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_catches_wrong_log_probs(dtype):
    def off_by_one(x, t):  # the log-prob of the next column
        return _eager_logp(x, torch.where(t == T_IGNORE, t, (t + 1) % x.shape[-1]))

    def unmasked(x, t):  # ignored tokens read column 0 instead of giving 0
        return torch.log_softmax(x.float(), -1).gather(-1, t.clamp_min(0)[:, None])[:, 0]

    rows = _logits_rows({
        "eager": _eager_logp,
        "prefkern_torch": lambda x, t: prefkern.logprobs_from_logits(x, t, backend="torch"),
        "off_by_one": off_by_one,
        "unmasked": unmasked,
    }, dtype)
    assert _status(rows) == {"eager": "ok", "prefkern_torch": "ok", "off_by_one": "MISMATCH",
                             "unmasked": "MISMATCH"}
    assert rows["off_by_one"]["err_over_bound"] > 10
    assert "logprobs=" in rows["off_by_one"]["check"] and "dlogits=" in rows["eager"]["check"]
    assert all(r["err_over_bound"] <= 1 for n, r in rows.items() if r["status"] == "ok")


def test_gate_catches_a_dropped_temperature():
    temperature = 0.7

    def no_temperature(x, t):
        return _eager_logp(x, t)

    rows = _logits_rows({
        "eager": lambda x, t: _eager_logp(x, t, temperature),
        "prefkern_torch": lambda x, t: prefkern.logprobs_from_logits(
            x, t, temperature=temperature, backend="torch"),
        "no_temperature": no_temperature,
    }, temperature=temperature)
    assert _status(rows) == {"eager": "ok", "prefkern_torch": "ok",
                             "no_temperature": "MISMATCH"}


def test_gate_catches_a_gradient_off_by_one_percent():
    rows = _logits_rows({"eager": _eager_logp, "grad_x1.01": (_eager_logp, 1.01)})
    assert _status(rows) == {"eager": "ok", "grad_x1.01": "MISMATCH"}
    # the log-probs are right: only the gradient fails
    checks = dict(c.split("=") for c in rows["grad_x1.01"]["check"].split())
    assert float(checks["logprobs"]) <= 1 < float(checks["dlogits"])


def _linear(dtype, n=32, h=64, v=1000, seed=0):
    hidden, weight, targets = peaked_problem(n, h, v, dtype, ignore_frac=0.1, seed=seed)
    gen = torch.Generator().manual_seed(1)
    return hidden, weight, targets, torch.randn(n, generator=gen), torch.randn(n, generator=gen)


def _linear_rows(dtype, extra: dict, mode="fwd+bwd", with_entropy=False, seed=0) -> dict:
    """The suite's providers (prefkern_torch, torch_eager, torch's linear_cross_entropy) plus
    ``extra`` ({name: (hid, wt, targets, g_logp, g_ent) -> step}) on one linear problem."""
    hidden, weight, targets, g_logp, g_ent = _linear(dtype, seed=seed)
    grad = mode != "fwd"
    hid, wt = hidden.detach().requires_grad_(grad), weight.detach().requires_grad_(grad)
    g_e = g_ent if with_entropy else None
    steps, _ = providers(hid, wt, targets, mode, with_entropy)
    cases = [Case(name, as_step(name, fn, mode, g_logp, g_e), 1.0, "TFLOP/s", (hid, wt))
             for name, fn in steps.items()]
    cases += [Case(name, make(hid, wt, targets, g_logp, g_e), 1.0, "TFLOP/s", (hid, wt))
              for name, make in extra.items()]
    reference = linear_logprobs_reference(
        hid, wt, targets, with_entropy=with_entropy,
        upstream={"logprobs": g_logp, "entropy": g_e} if grad else None)
    problem = Problem("tiny", mode, str(dtype), cases, "torch_eager", reference=reference)
    return {r["provider"]: r for r in run_problem("demo", problem, CPU, quick=True)}


def _linear_eager_step(hid, wt, targets, g_logp, g_ent, *, round_logits=False, scale=1.0):
    def step():
        logits = hid.float() @ wt.float().T  # fp32 accumulation, as the contract
        if round_logits:
            logits = logits.to(hid.dtype).float()
        log_p = logits.log_softmax(-1)
        logp = _masked(log_p.gather(-1, targets.clamp_min(0)[:, None])[:, 0], targets)
        if torch.is_grad_enabled() and hid.requires_grad:
            (logp * g_logp * scale).sum().backward()
        return logp.detach(), None

    return step


def test_gate_catches_logits_rounded_to_bf16():
    """linear_logprobs' contract: logits accumulated in fp32 and never rounded to bf16."""
    rows = _linear_rows(torch.bfloat16, {
        "fp32_logits": _linear_eager_step,
        "bf16_logits": lambda *a: _linear_eager_step(*a, round_logits=True),
    })
    assert rows["prefkern_torch"]["status"] == "ok", rows["prefkern_torch"]
    assert rows["fp32_logits"]["status"] == "ok", rows["fp32_logits"]
    assert rows["bf16_logits"]["status"] == "MISMATCH"
    checks = dict(c.split("=") for c in rows["bf16_logits"]["check"].split())
    assert float(checks["logprobs"]) > 1


@pytest.mark.parametrize("with_entropy", [False, True])
def test_real_linear_providers_pass_and_a_scaled_gradient_fails(with_entropy):
    def scaled(hid, wt, targets, g_logp, g_ent):
        steps, _ = providers(hid, wt, targets, "fwd+bwd", with_entropy)
        return as_step("scaled", steps["prefkern_torch"], "fwd+bwd", g_logp * 1.01,
                       None if g_ent is None else g_ent * 1.01)

    def no_backward(hid, wt, targets, g_logp, g_ent):  # right outputs, no gradients
        steps, _ = providers(hid, wt, targets, "fwd", with_entropy)
        return as_step("no_backward", steps["prefkern_torch"], "fwd", g_logp, g_ent)

    rows = _linear_rows(torch.float32, {"grad_x1.01": scaled, "no_backward": no_backward},
                        with_entropy=with_entropy)
    real = [name for name in rows if name.startswith(("prefkern", "torch_"))]
    assert {"prefkern_torch", "torch_eager"} <= set(real)
    assert all(rows[name]["status"] == "ok" for name in real), [rows[n] for n in real]
    assert rows["grad_x1.01"]["status"] == "MISMATCH"
    checks = dict(c.split("=") for c in rows["grad_x1.01"]["check"].split())
    assert float(checks["logprobs"]) <= 1
    assert float(checks["dhidden"]) > 1 and float(checks["dweight"]) > 1
    assert rows["no_backward"]["status"] == "MISMATCH"
    assert "dhidden=missing dweight=missing" in rows["no_backward"]["check"]


@pytest.mark.parametrize("seed", [0, 4, 7])
def test_linear_gate_is_independent_of_the_seed(seed):
    """The inputs come from their own generator (targets drawn from the model's softmax
    included), and the bf16 base is the contract's (d-logits rounded once where they feed the
    GEMMs; the spec's fp32 d-logits made input seed 4 fail a correct dhidden at 1.14x the
    bound): a correct bf16 provider passes at any seed, and a gradient 2% off still fails (1%
    is 1-3 bf16 steps: caught at 8 of 10 input seeds)."""
    torch.manual_seed(seed)
    assert torch.equal(peaked_problem(16, 8, 300, ignore_frac=0.2)[2],
                       peaked_problem(16, 8, 300, ignore_frac=0.2)[2])

    def scaled(hid, wt, targets, g_logp, g_ent):
        steps, _ = providers(hid, wt, targets, "fwd+bwd", False)
        return as_step("scaled", steps["prefkern_torch"], "fwd+bwd", g_logp * 1.02, None)

    rows = _linear_rows(torch.bfloat16, {"grad_x1.02": scaled}, seed=seed)
    assert rows["prefkern_torch"]["status"] == "ok", rows["prefkern_torch"]
    assert rows["grad_x1.02"]["status"] == "MISMATCH", rows["grad_x1.02"]


def test_gae_gate_catches_wrong_advantages():
    """GAE rows are held to the rule against the loop in fp64 (fp32 base, T terms per output):
    a wrong lambda or gamma, a dropped truncation bootstrap and bf16-rounded outputs fail."""
    from prefkern.bench.reference_check import WholeReference
    from prefkern.bench.suites.gae import make_inputs
    from prefkern.reference.advantages import gae_loop_over_time

    rewards, values, mask, truncated = make_inputs(16, 256, CPU)
    inputs = (rewards, values, mask)
    kw = dict(gamma=1.0, lam=0.95, truncated=truncated, lam_critic=1.0)

    def ours(**change):
        return lambda: prefkern.gae(*inputs, **{**kw, **change}, backend="torch")

    providers_ = {"loop": lambda: gae_loop_over_time(*inputs, **kw), "prefkern_torch": ours(),
                  "lam_0.94": ours(lam=0.94), "gamma_0.999": ours(gamma=0.999),
                  "no_truncation": ours(truncated=None),
                  "bf16_outputs": lambda: tuple(x.bfloat16().float() for x in ours()())}
    reference = WholeReference(gae_loop_over_time, inputs, kw, ("advantages", "returns"), 256)
    problem = Problem("16x256", "egae", "fp32",
                      [Case(name, fn, 1.0, "GB/s") for name, fn in providers_.items()], "loop",
                      reference=reference)
    rows = {r["provider"]: r for r in run_problem("gae", problem, CPU, quick=True)}
    assert _status(rows) == {"loop": "ok", "prefkern_torch": "ok", "lam_0.94": "MISMATCH",
                             "gamma_0.999": "MISMATCH", "no_truncation": "MISMATCH",
                             "bf16_outputs": "MISMATCH"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_reference_is_the_rule_on_whole_tensors(dtype):
    """Row chunks (and recomputing instead of caching) give the same errors and bounds as the
    rule applied to whole tensors: ref = spec on fp64 inputs, base = spec on the inputs (with
    the contract's rounding of the d-logits for bf16)."""
    hidden, weight, targets, g_logp, g_ent = _linear(dtype, n=37)
    hid, wt = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    out = prefkern.linear_logprobs(hid, wt, targets, return_entropy=True, backend="torch")
    ((out.logprobs * g_logp).sum() + (out.entropy * g_ent).sum()).backward()
    outs, grads = (out.logprobs.detach(), out.entropy.detach()), (hid.grad, wt.grad)

    def whole(dt):
        h, w = (t.detach().to(dt).requires_grad_() for t in (hidden, weight))
        half = dt not in (torch.float32, torch.float64)
        o = linear_logprobs_ref(h, w, targets, return_entropy=True,
                                dlogits_dtype=dt if half else None)
        ((o.logprobs * g_logp.to(o.logprobs.dtype)).sum()
         + (o.entropy * g_ent.to(o.entropy.dtype)).sum()).backward()
        return (o.logprobs, o.entropy, h.grad, w.grad)

    ref, base = whole(torch.float64), whole(dtype)
    n, v = targets.shape[0], weight.shape[0]
    expect = [rule_error(o, r, b, red) for o, r, b, red in zip(
        (*outs, *grads), ref, base, (v, v, v, n), strict=True)]
    upstream = {"logprobs": g_logp, "entropy": g_ent}
    for kw in ({}, {"chunk_rows": 5}, {"chunk_rows": 5, "cache_bytes": 0}):
        reference = linear_logprobs_reference(hid, wt, targets, upstream=upstream,
                                              with_entropy=True, **kw)
        for _ in range(2):  # the second check reuses the cache (or recomputes)
            got = reference.check(outs, grads)
            assert [c.name for c in got] == ["logprobs", "entropy", "dhidden", "dweight"]
            for c, (err, bound, _) in zip(got, expect, strict=True):
                assert c.ok and c.err == pytest.approx(err, rel=1e-6, abs=1e-15), c
                # in chunks the base's fp32 matmuls round differently: same size, not same bits
                assert c.bound == pytest.approx(bound, rel=0.2 if kw else 1e-6), c
        assert (reference._cache is not None) == (kw.get("cache_bytes") != 0)


def test_peaked_inputs_ignore_a_stated_fraction():
    _, _, targets = peaked_problem(200, 64, 1000, torch.float32, ignore_frac=0.1)
    assert (targets == -100).sum() == 20
    assert ((targets >= 0) & (targets < 1000)).sum() == 180
    _, _, again = peaked_problem(200, 64, 1000, torch.float32)
    assert (again >= 0).all()


def test_divergence_gate_checks_scalar_losses_by_their_gradients():
    """A provider returning only a batchmean loss is checked on dhidden and dweight; a wrong
    beta or a gradient 1% off fails, a right scalar loss passes."""
    from prefkern.bench.reference_check import linear_divergence_reference

    n, h, v = 48, 32, 500
    hidden, weight, targets = peaked_problem(n, h, v, torch.float32, ignore_frac=0.1)
    t_hidden, t_weight, _ = peaked_problem(n, h, v, torch.float32, seed=1)
    valid = targets != T_IGNORE
    g = valid.float() / valid.sum()

    def provider(beta, scale=1.0, per_token=False):
        def fn(h_, w_):
            d = prefkern.linear_divergence(h_, w_, t_hidden, t_weight, targets, kind="jsd",
                                           beta=beta, backend="torch")
            if per_token:
                (d * g).sum().backward()
                return (d.detach(),)
            loss, _ = prefkern.losses.distill_loss(h_, w_, t_hidden, t_weight, targets,
                                                   kind="jsd", beta=beta, backend="torch")
            (scale * loss).backward()
            return (None,)
        return fn

    fakes = {"per_token": provider(0.5, per_token=True), "scalar": provider(0.5),
             "wrong_beta": provider(0.4), "grad_x1.01": provider(0.5, 1.01)}
    cases = []
    for name, fn in fakes.items():
        hid, wt = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        cases.append(Case(name, lambda fn=fn, hid=hid, wt=wt: fn(hid, wt), 1.0, "TFLOP/s",
                          (hid, wt)))
    reference = linear_divergence_reference(hidden, weight, t_hidden, t_weight, targets,
                                            kind="jsd", beta=0.5, upstream={"divergence": g})
    problem = Problem("tiny", "fwd+bwd", "float32", cases, "per_token", reference=reference)
    rows = {r["provider"]: r for r in run_problem("demo", problem, CPU, quick=True)}
    assert _status(rows) == {"per_token": "ok", "scalar": "ok", "wrong_beta": "MISMATCH",
                             "grad_x1.01": "MISMATCH"}
    assert "divergence=" in rows["per_token"]["check"]
    assert "divergence" not in rows["scalar"]["check"] and "dweight=" in rows["scalar"]["check"]


def test_preference_gate_fails_a_wrong_beta():
    """The preference suite's gate (per-token upstream from the fp64 sequence loss) passes the
    suite's providers and fails the same loss at beta 0.2."""
    from prefkern.bench.suites import preference

    (problem,) = preference.problems(CPU, "tiny")
    hid, wt = problem.cases[0].grad_to_none
    _, _, targets, ref_hidden = preference._batch(2, 32, 64, 1000, torch.float32, CPU)

    def wrong():
        loss, _ = prefkern.losses.linear_preference_loss(
            hid.view(4, 32, 64), wt, targets, ref_hidden=ref_hidden, ref_weight=wt.detach(),
            beta=0.2, backend="torch")
        return loss

    problem.cases.append(Case("beta_0.2", scalar_loss_step(wrong), 1.0, "TFLOP/s",
                              (hid, wt)))
    rows = {r["provider"]: r for r in run_problem("preference", problem, CPU, quick=True)
            if "status" in r}
    assert rows["torch_eager"]["status"] == "ok" and rows["prefkern"]["status"] == "ok"
    assert rows["beta_0.2"]["status"] == "MISMATCH"


def test_cpu_peak_memory_is_measured():
    """The CPU peak is the running maximum of the call's tensor allocations: 8 + 4 MB live
    at once here (the 4 MB temporary is freed before the 12 MB one), inputs excluded."""
    from prefkern.bench.timing import peak_extra_gib

    x = torch.randn(1000, 1000)  # 4 MB, allocated before: not counted

    def fn():
        y = x * 2          # 4 MB
        z = torch.empty(2_000_000)  # 8 MB (y still live: 12 MB)
        del y
        w = torch.empty(3_000_000)  # 12 MB (z live: 20 MB)
        return z.sum() + w.sum()

    peak = peak_extra_gib(fn, torch.device("cpu")) * 2**30
    assert 20e6 <= peak < 20e6 + 64 * 1024, peak


def test_profile_steps_agree_and_prefkern_holds_no_logits(tmp_path):
    """`prefkern profile` on the micro model: for DPO, GRPO and distillation the step's loss
    is the eager (materialized logits) one, and prefkern's peak memory is below eager's, which
    holds the (B, T, V) fp32 logits. (DPO's gradient-in-forward path keeps one chunk of pairs'
    logits within its budget: the whole micro batch fits, so there it is no worse than eager.)"""
    from prefkern.cli import main

    assert main(["profile", "--preset", "micro", "--device", "cpu", "--out",
                 str(tmp_path)]) == 0
    import json

    (path,) = tmp_path.glob("*_profile_micro.json")
    rows = json.loads(path.read_text())["rows"]
    logits_bytes = 4 * 255 * 4000 * 4
    for workload in ("dpo", "grpo", "distill"):
        eager, ours = (next(r for r in rows if r["workload"] == workload and r["impl"] == impl)
                       for impl in ("eager", "prefkern"))
        assert abs(eager["loss"] - ours["loss"]) <= 1e-4 * max(1.0, abs(eager["loss"]))
        assert eager["peak_GiB"] * 2**30 >= logits_bytes
        bound = 1.05 if workload == "dpo" else 0.5
        assert ours["peak_GiB"] < bound * eager["peak_GiB"], (workload, ours, eager)


def test_table_without_tabulate_still_prints_every_row(monkeypatch):
    """A bare GPU image may lack tabulate: the printout degrades to tab-separated cells."""
    import builtins

    real_import = builtins.__import__

    def no_tabulate(name, *args, **kwargs):
        if name == "tabulate":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    rows = [dict(op="x", mode="fwd", shape="n=1", dtype="fp32", provider="p", ms_p50=1.0,
                 status="ok")]
    monkeypatch.setattr(builtins, "__import__", no_tabulate)
    text = table(rows)
    assert "tabulate not installed" in text and "\tp\t" in text


@pytest.mark.parametrize("suite", ["policy", "preference"])
def test_the_first_gpu_shape_of_each_loss_suite_is_checked_against_fp64(suite):
    """The GPU shapes must not fall back to comparing providers with eager: the smaller default
    shape of each loss suite is within the fp64 gate's limit (the largest, where eager cannot
    run, is the one left unchecked)."""
    import importlib

    module = importlib.import_module(f"prefkern.bench.suites.{suite}")
    sides = 2 if suite == "preference" else 1  # chosen and rejected rows
    sizes = [sides * b * t * v for b, t, _, v in module.SHAPES["default"]]
    assert min(sizes) <= module.CHECK_LIMIT < max(sizes)
