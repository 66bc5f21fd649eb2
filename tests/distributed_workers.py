"""Worker functions for the multi-process tests (spawned by torch.multiprocessing: importable
by module name). Each rank runs the sharded op and the single-device op on the same inputs and
raises on a mismatch; the spawning test fails with the rank's traceback."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def _init(rank: int, world: int, store_path: str, backend: str = "gloo") -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world,
                            init_method=f"file://{store_path}")


def _finish() -> None:
    """Tear the group down and leave without the interpreter's shutdown: gloo's threads can
    abort it ("terminate called without an active exception", SIGABRT, about 1 run in 20)."""
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def shard_bounds(vocab: int, world: int, rank: int) -> tuple[int, int]:
    """Uneven contiguous shards: the first vocab % world ranks get one row more."""
    base, extra = divmod(vocab, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def _problem(case: dict):
    gen = torch.Generator().manual_seed(case.get("seed", 0))
    n, h, v = case["n"], case["h"], case["v"]
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * (3.0 / h**0.5)
    bias = torch.randn(v, generator=gen) if case.get("bias") else None
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[torch.rand(n, generator=gen) < 0.25] = case.get("ignore_index", -100)
    temperature = torch.rand(n, generator=gen) + 0.5 if case.get("row_temp") else 0.9
    upstream = [torch.randn(n, generator=gen) for _ in range(4)]
    return hidden, weight, bias, targets, temperature, upstream


def linear_logprobs_case(rank: int, world: int, store_path: str, case: dict) -> None:
    from prefkern import linear_logprobs
    from prefkern.reference import linear_logprobs_ref
    from prefkern.testing import assert_rule

    nccl = case.get("nccl", False)  # one GPU per rank
    _init(rank, world, store_path, "nccl" if nccl else "gloo")
    try:
        hidden, weight, bias, targets, temperature, up = _problem(case)
        if nccl:
            device = torch.device("cuda", rank)
            hidden, weight, targets = (t.to(device) for t in (hidden, weight, targets))
            bias = None if bias is None else bias.to(device)
            temperature = temperature.to(device) if torch.is_tensor(temperature) else \
                temperature
            up = [u.to(device) for u in up]
        dtype = case.get("dtype", torch.float32)
        start, stop = shard_bounds(case["v"], world, rank)
        targets = None if case.get("no_targets") else targets
        if case.get("k"):  # K ids per row (a teacher's top-k), some ignored, repeats allowed
            gen = torch.Generator().manual_seed(11)
            targets = torch.randint(0, case["v"], (case["n"], case["k"]), generator=gen)
            targets[:, 1] = targets[:, 0]
            ignore = case.get("ignore_index", -100)
            targets[torch.rand(targets.shape, generator=gen) < 0.2] = ignore
            targets[0] = ignore  # a row with no valid id
            up[0] = torch.randn(targets.shape, generator=gen)
        opts = dict(temperature=temperature, softcap=case.get("softcap"), return_entropy=True,
                    ignore_index=case.get("ignore_index", -100),
                    return_lse=True, return_stats=case.get("stats", False),
                    backend=case["backend"], mode=case.get("mode", "auto"))
        layout = dict(vocab_start=start, vocab_size=case["v"]) if case.get("given") else {}

        def run(fn, h, w, b, **kw):
            h, w = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
            b = None if b is None else b.clone().requires_grad_(True)
            out = fn(h, w, targets, b, **opts, **kw)
            loss = (out.entropy * up[1]).sum() + (out.lse * up[2]).sum()
            if out.logprobs is not None:
                loss = loss + (out.logprobs * up[0]).sum()
            if opts["return_stats"]:
                loss = loss + (out.stats.sum_p2 * up[3]).sum() + out.stats.mean_logit.sum()
            loss.backward()
            return out, h.grad, w.grad, None if b is None else b.grad

        cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        sharded = run(linear_logprobs, cast(hidden), cast(weight[start:stop]),
                      cast(None if bias is None else bias[start:stop]),
                      process_group=dist.group.WORLD, **layout)
        single = run(linear_logprobs, cast(hidden), cast(weight), cast(bias))
        exact = run(lambda *a, backend, mode, **k: linear_logprobs_ref(*a, **k),
                    *(None if t is None else t.double() for t in (hidden, weight, bias)))
        names = ["logprobs", "entropy", "lse"] + (["sum_p2", "mean_logit"]
                                                  if opts["return_stats"] else [])

        def field(out, name):
            return getattr(out.stats if name in ("sum_p2", "mean_logit") else out, name)

        for name in names:
            if field(exact[0], name) is None:
                continue
            assert_rule(field(sharded[0], name), field(exact[0], name), field(single[0], name),
                        f"rank {rank}: {name}", reduction=case["v"])
        if opts["return_stats"] and targets is not None:
            assert torch.equal(sharded[0].stats.target_is_argmax,
                               single[0].stats.target_is_argmax), "target_is_argmax"
        shard = slice(start, stop)
        grads = [("dhidden", sharded[1], exact[1], single[1], case["v"]),
                 ("dweight", sharded[2], exact[2][shard], single[2][shard], case["n"])]
        if bias is not None:
            grads.append(("dbias", sharded[3], exact[3][shard], single[3][shard], case["n"]))
        for name, o, r, b, red in grads:
            assert o.dtype == dtype, name
            assert_rule(o, r, b, f"rank {rank}: {name}", reduction=red)
        dist.barrier()  # no rank tears the group down while another still uses it
    except BaseException:
        dist.destroy_process_group()
        raise
    _finish()


def dtensor_head_case(rank: int, world: int, store_path: str, case: dict) -> None:
    """A DTensor LM head (Shard(0): vocab parallel without a gather; Shard(1) / Replicate:
    gathered) gives the single-device log-probs and gradients, the weight's gradient arriving
    as a DTensor with the weight's placement."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from prefkern import linear_logprobs

    _init(rank, world, store_path)
    try:
        hidden, weight, bias, targets, _, up = _problem(case)
        mesh = init_device_mesh("cpu", (world,))
        placement = {"rows": Shard(0), "cols": Shard(1), "replicate": Replicate()}[case["how"]]
        w = distribute_tensor(weight, mesh, [placement]).requires_grad_(True)
        bias_rows = case["how"] == "rows" and not case.get("replicated_bias")
        b = distribute_tensor(bias, mesh, [Shard(0) if bias_rows else Replicate()])
        b.requires_grad_(True)
        h = hidden.clone().requires_grad_(True)
        # vocab parallel on the mesh (same hidden everywhere) only when asked for
        group = dict(process_group=mesh.get_group()) if case.get("vocab_parallel") else {}
        out = linear_logprobs(h, w, targets, b, return_entropy=True, softcap=5.0,
                              backend="torch", **group)
        ((out.logprobs * up[0]).sum() + (out.entropy * up[1]).sum()).backward()
        h1, w1, b1 = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
        want = linear_logprobs(h1, w1, targets, b1, return_entropy=True, softcap=5.0,
                               backend="torch")
        ((want.logprobs * up[0]).sum() + (want.entropy * up[1]).sum()).backward()
        close = dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.logprobs, want.logprobs, **close)
        torch.testing.assert_close(out.entropy, want.entropy, **close)
        torch.testing.assert_close(h.grad, h1.grad, **close)
        assert w.grad.placements == w.placements
        torch.testing.assert_close(w.grad.full_tensor(), w1.grad, **close)
        torch.testing.assert_close(b.grad.full_tensor(), b1.grad, **close)
        dist.barrier()  # no rank tears the group down while another still uses it
    except BaseException:
        dist.destroy_process_group()
        raise
    _finish()


def data_parallel_case(rank: int, world: int, store_path: str, case: dict) -> None:
    """Each rank holds its slice of a batch: masked_whiten over the group equals whitening the
    whole batch, aggregate() with global_normalizer sums over the ranks to the whole batch's
    loss, for every aggregation mode, and group advantages of groups spread over the ranks
    equal the whole batch's."""
    from prefkern.losses import aggregate, global_normalizer
    from prefkern.losses.policy import AGGREGATIONS
    from prefkern.ops.whiten import masked_whiten

    _init(rank, world, store_path)
    try:
        gen = torch.Generator().manual_seed(3)
        b, t = 4 * world, 9
        values = torch.randn(b, t, generator=gen)
        mask = torch.rand(b, t, generator=gen) < 0.7
        mask[1] = False  # an empty sequence
        mine = slice(rank * 4, rank * 4 + 4)
        whitened = masked_whiten(values[mine], mask[mine], process_group=dist.group.WORLD)
        torch.testing.assert_close(whitened, masked_whiten(values, mask)[mine])
        for agg in AGGREGATIONS:
            for seq_count in ("all", "nonempty"):
                norm = global_normalizer(mask[mine], agg, dist.group.WORLD, seq_count)
                part = aggregate(values[mine], mask[mine], agg, norm, 7.0, seq_count)
                total = part.clone()
                dist.all_reduce(total)
                want = aggregate(values, mask, agg, None, 7.0, seq_count)
                torch.testing.assert_close(total, want, msg=f"{agg} {seq_count}")
        # group advantages whose groups span the ranks (ids interleaved over the batch)
        from prefkern import group_advantages

        scores = torch.randn(b, generator=gen)
        scores[::5] = 0.0  # gpg counts the nonzero scores of the whole batch
        ids = torch.arange(b) % 3 * 1000 + 7  # 3 groups, every rank holding some of each
        for method in ("grpo", "dr_grpo", "rloo", "opo", "gpg", "reinforce_pp_baseline"):
            got, _ = group_advantages(scores[mine], ids[mine], method=method, mask=mask[mine],
                                      process_group=dist.group.WORLD)
            want, _ = group_advantages(scores, ids, method=method, mask=mask)
            torch.testing.assert_close(got, want[mine], msg=method)
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    _finish()


def linear_divergence_case(rank: int, world: int, store_path: str, case: dict) -> None:
    """linear_divergence over vocab shards of both heads equals the single-device op, the
    divergence, the policy's log-probs and every gradient (the reference's too)."""
    from prefkern import linear_divergence
    from prefkern.reference import linear_divergence_ref
    from prefkern.testing import assert_rule

    _init(rank, world, store_path)
    try:
        hidden, weight, bias, targets, temperature, up = _problem(case)
        gen = torch.Generator().manual_seed(11)
        ref_hidden = hidden + 0.3 * torch.randn(hidden.shape, generator=gen)
        ref_weight = weight + 0.3 * torch.randn(weight.shape, generator=gen)
        start, stop = shard_bounds(case["v"], world, rank)
        opts = dict(kind=case["kind"], beta=0.3, alpha=0.7, temperature=temperature,
                    softcap=case.get("softcap"), return_logprobs=True,
                    ignore_index=case.get("ignore_index", -100))

        def run(fn, shard, dtype=None, **kw):
            rows = slice(start, stop) if shard else slice(None)
            ts = [t.to(dtype) if dtype else t.clone() for t in
                  (hidden, weight[rows], bias[rows], ref_hidden, ref_weight[rows])]
            for t in ts:
                t.requires_grad_(True)
            out = fn(ts[0], ts[1], ts[3], ts[4], targets, bias=ts[2], **opts, **kw)
            divergence, logprobs = out[0], out[1]
            ((divergence * up[0]).sum() + (logprobs * up[1]).sum()).backward()
            return [divergence, logprobs] + [t.grad for t in ts]

        sharded = run(linear_divergence, True, process_group=dist.group.WORLD,
                      backend=case["backend"])
        single = run(linear_divergence, False, backend=case["backend"])
        exact = run(linear_divergence_ref, False, torch.float64)
        shard = slice(start, stop)
        names = ["divergence", "logprobs", "dhidden", "dweight", "dbias", "dref_hidden",
                 "dref_weight"]
        for k, name in enumerate(names):
            o, r, b = sharded[k], exact[k], single[k]
            if name in ("dweight", "dbias", "dref_weight"):
                r, b = r[shard], b[shard]
            assert_rule(o, r.float(), b, f"rank {rank}: {name}",
                        reduction=case["n"] if name in ("dweight", "dbias", "dref_weight")
                        else case["v"])
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    _finish()


def losses_case(rank: int, world: int, store_path: str, case: dict) -> None:
    """linear_distill_loss, linear_policy_loss and linear_preference_loss on vocab shards
    equal one device (loss, dhidden, the dweight shard), on the fused (gradient-in-forward)
    path, which the sharded call must take too, and on the two-pass path."""
    from prefkern.losses import linear_distill_loss, linear_policy_loss, linear_preference_loss

    _init(rank, world, store_path)
    try:
        gen = torch.Generator().manual_seed(5)
        b, t, h, v = 4, 7, 16, 53
        hidden = torch.randn(b, t, h, generator=gen)
        weight = torch.randn(v, h, generator=gen) * 0.5
        targets = torch.randint(0, v, (b, t), generator=gen)
        ignore = case.get("ignore_index", -100)  # >= 0: must not meet a shard's local id
        targets[:, :2] = ignore
        old = -torch.rand(b, t, generator=gen) * 3
        adv = torch.randn(b, generator=gen)
        start, stop = shard_bounds(v, world, rank)
        backend, fused = case["backend"], case["fused"]
        temperature = torch.rand(b, t, generator=gen) + 0.5 if case.get("row_temp") else 0.7

        def grads(fn, shard, **kw):
            hs = hidden.clone().requires_grad_(True)
            ws = (weight[start:stop] if shard else weight).clone().requires_grad_(True)
            loss = fn(hs, ws, **kw)[0]
            took_fused = type(loss.grad_fn).__name__.startswith("GradientInForward")
            loss.backward()
            return loss, hs.grad, ws.grad, took_fused

        group = dict(process_group=dist.group.WORLD)
        teacher_hidden = hidden + 0.2 * torch.randn(hidden.shape, generator=gen)

        def distill(hs, ws, **kw):
            rows = slice(start, stop) if kw else slice(None)
            fn = linear_distill_loss if fused else \
                __import__("prefkern.losses", fromlist=["distill_loss"]).distill_loss
            return fn(hs, ws, teacher_hidden, weight[rows] * 1.1, targets, kind="jsd", beta=0.3,
                      weight_hard_loss=0.5, temperature=2.0, softcap=case.get("softcap"),
                      ignore_index=ignore, backend=backend, **kw)

        def policy(hs, ws, **kw):
            return linear_policy_loss(hs, ws, targets, old, adv, loss_type="grpo",
                                      temperature=temperature, softcap=case.get("softcap"),
                                      entropy_coef=0.01, fused=fused, ignore_index=ignore,
                                      backend=backend, **kw)

        def preference(hs, ws, **kw):
            return linear_preference_loss(hs, ws, targets, ref_logps=(old[:2].sum(-1),
                                                                      old[2:].sum(-1)),
                                          loss_type="sigmoid", fused=fused, backend=backend,
                                          ignore_index=ignore, **kw)

        for name, fn in (("distill", distill), ("policy", policy), ("preference", preference)):
            loss, dh, dw, took = grads(fn, True, **group)
            want, want_dh, want_dw, _ = grads(fn, False)
            assert took == fused, f"{name}: fused path taken = {took}, wanted {fused}"
            torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6, msg=name)
            torch.testing.assert_close(dh, want_dh, rtol=1e-4, atol=1e-6, msg=name)
            torch.testing.assert_close(dw, want_dw[start:stop], rtol=1e-4, atol=1e-6, msg=name)
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    _finish()


def fsdp_style_head_case(rank: int, world: int, store_path: str, case: dict) -> None:
    """FSDP2 shards the head by rows over data-parallel ranks whose tokens differ: a
    Shard(0) DTensor weight without process_group is gathered, and each rank's results are
    those of its own tokens on one device."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from prefkern import linear_logprobs

    _init(rank, world, store_path)
    try:
        _, weight, _, _, _, _ = _problem(case)
        gen = torch.Generator().manual_seed(100 + rank)  # this rank's own tokens
        hidden = torch.randn(case["n"] + rank, case["h"], generator=gen)
        targets = torch.randint(0, case["v"], (case["n"] + rank,), generator=gen)
        mesh = init_device_mesh("cpu", (world,))
        w = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_(True)
        out = linear_logprobs(hidden, w, targets, backend="torch")
        out.sum().backward()
        w1 = weight.clone().requires_grad_(True)
        want = linear_logprobs(hidden, w1, targets, backend="torch")
        want.sum().backward()
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
        # full_tensor()'s backward hands each rank its rows of its own gradient (FSDP2's hooks,
        # not DTensor autograd, then reduce-scatter them across the data-parallel ranks)
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(w.shape, mesh, w.placements)
        rows = slice(offset[0], offset[0] + shape[0])
        torch.testing.assert_close(w.grad.to_local(), w1.grad[rows], rtol=1e-5, atol=1e-6)
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    _finish()


def deepspeed_zero3_case(rank: int, world: int, store_path: str, case: dict) -> None:
    """A tiny model under DeepSpeed ZeRO-3 (every parameter partitioned between calls), the same
    data on every rank: log-probs through head_logprobs, and a gradient-in-forward policy loss
    through head_call, equal a plain copy of the model (values, the head's and the body's
    gradients, gathered with safe_get_full_grad); the raw partitioned weight, and a weight
    gathered for the forward only, are clear errors."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from prefkern import linear_logprobs
    from prefkern.integrations.transformers import head_call, head_logprobs
    from prefkern.losses import linear_policy_loss

    _init(rank, world, store_path)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    try:
        deepspeed.init_distributed(dist_backend="gloo")  # takes the group made above
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(1)
        n, v = 6, 37
        x = torch.randn(n, 8, generator=gen)
        y = torch.randint(0, v, (n,), generator=gen)
        y[1] = -100
        up = torch.randn(n, generator=gen)
        old, adv = -torch.rand(1, n, generator=gen), torch.randn(1, generator=gen)

        fused_nodes = []

        def policy(w, b, h):
            out = linear_policy_loss(h[None], w, y[None], old, adv, bias=b, loss_type="grpo",
                                     backend="torch")
            fused_nodes.append(type(out[0].grad_fn).__name__)
            return out

        class Tiny(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.body = torch.nn.Linear(8, 16)
                self.lm_head = torch.nn.Linear(16, v, bias=case.get("bias", False))

            def forward(self, inputs):
                hidden = self.body(inputs)
                if case["what"] == "logprobs":
                    return (head_logprobs(self.lm_head, hidden, y, backend="torch") * up).sum()
                return head_call(self.lm_head, policy, hidden)[0]

        model, plain = Tiny(), Tiny()
        plain.load_state_dict(model.state_dict())
        config = {"train_micro_batch_size_per_gpu": 1,
                  "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                  "optimizer": {"type": "SGD", "params": {"lr": 0.0}},
                  "zero_allow_untested_optimizer": True}
        engine, *_ = deepspeed.initialize(model=model, config=config,
                                          model_parameters=model.parameters())
        head = engine.module.lm_head
        assert head.weight.numel() == 0, "ZeRO-3 did not partition the head"
        loss = engine(x)
        if case["what"] == "policy":  # the gradient-in-forward path (DeepSpeed wraps it)
            assert fused_nodes[0].startswith("GradientInForward"), fused_nodes
        engine.backward(loss)
        want = plain(x)
        want.backward()
        torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
        for name in ("lm_head.weight", "body.weight", "body.bias") + \
                (("lm_head.bias",) if case.get("bias") else ()):
            got = safe_get_full_grad(engine.module.get_parameter(name))
            torch.testing.assert_close(got, plain.get_parameter(name).grad, rtol=1e-5,
                                       atol=1e-6, msg=name)
        try:  # the partition itself, outside the module's call
            linear_logprobs(engine.module.body(x), head.weight, y)
        except ValueError as err:
            assert "ZeRO-3" in str(err), err
        else:
            raise AssertionError("an empty ZeRO-3 partition was accepted")
        hidden = engine.module.body(x).detach().requires_grad_(True)
        with deepspeed.zero.GatheredParameters([head.weight], modifier_rank=None):
            out = linear_logprobs(hidden, head.weight, y, backend="torch")
        try:  # gathered for the forward only: the backward finds the partition
            out.sum().backward()
        except ValueError as err:
            assert "ZeRO-3" in str(err), err
        else:
            raise AssertionError("a released ZeRO-3 weight reached the backward")
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    _finish()


def verl_linear_cross_entropy_case(rank: int, world: int, store_path: str, case: dict) -> None:
    """verl's vocab-parallel layout (equal shards, rank r rows [r V_r, (r + 1) V_r)) through
    prefkern.integrations.verl.linear_cross_entropy equals one device, dhidden being each
    rank's share that verl's caller sums over the group (as its kernel's test does)."""
    from prefkern.integrations.verl import linear_cross_entropy

    _init(rank, world, store_path)
    try:
        gen = torch.Generator().manual_seed(2)
        local, n, h = 13, 9, 16
        hidden = torch.randn(n, h, generator=gen)
        weight = torch.randn(world * local, h, generator=gen) * 0.7
        labels = torch.randint(0, world * local, (n,), generator=gen)
        g_logp, g_ent = torch.randn(n, generator=gen), torch.randn(n, generator=gen)

        def run(w, group, dtype=torch.float32):
            hs = hidden.to(dtype, copy=True).requires_grad_(True)
            ws = w.to(dtype, copy=True).requires_grad_(True)
            logp, entropy = linear_cross_entropy(hs, ws, labels, 0.8, "none", group)
            ((logp * g_logp.to(dtype)).sum() + (entropy * g_ent.to(dtype)).sum()).backward()
            return logp, entropy, hs.grad, ws.grad

        from prefkern.testing import assert_rule

        rows = slice(rank * local, (rank + 1) * local)
        sharded = list(run(weight[rows], dist.group.WORLD))
        dist.all_reduce(sharded[2])  # verl's caller sums the ranks' dhidden shares
        single = run(weight, None)
        exact = run(weight, None, torch.float64)
        for k, (name, red) in enumerate((("logp", world * local), ("entropy", world * local),
                                          ("dhidden", world * local), ("dweight", n))):
            pick = (lambda t: t[rows]) if name == "dweight" else (lambda t: t)
            assert_rule(sharded[k], pick(exact[k]), pick(single[k]), f"rank {rank}: {name}",
                        reduction=red)
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    _finish()


def fsdp2_model_case(rank: int, world: int, store_path: str, case: dict) -> None:
    """A tiny model wrapped with FSDP2 (fully_shard: every parameter a Shard(0) DTensor, the
    head's rows spread over the data-parallel ranks), each rank its own tokens: log-probs
    through head_logprobs and a gradient-in-forward loss through head_call equal the plain
    model's, and the gradients FSDP2 reduce-scatters are the mean of the ranks' plain ones."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from prefkern.integrations.transformers import head_call, head_logprobs
    from prefkern.losses import linear_policy_loss

    _init(rank, world, store_path)
    try:
        torch.manual_seed(0)
        v = 37

        class Tiny(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.body = torch.nn.Linear(8, 16)
                self.lm_head = torch.nn.Linear(16, v, bias=True)

            def forward(self, x, y, old, adv):
                hidden = self.body(x)
                if case["what"] == "logprobs":
                    return head_logprobs(self.lm_head, hidden, y, backend="torch").sum()
                return head_call(self.lm_head, lambda w, b, h: linear_policy_loss(
                    h[None], w, y[None], old, adv, bias=b, loss_type="grpo",
                    backend="torch")[0], hidden)

        model, plain = Tiny(), Tiny()
        plain.load_state_dict(model.state_dict())
        mesh = init_device_mesh("cpu", (world,))
        fully_shard(model.lm_head, mesh=mesh)
        fully_shard(model, mesh=mesh)

        def batch(r):
            gen = torch.Generator().manual_seed(10 + r)
            y = torch.randint(0, v, (5,), generator=gen)
            y[0] = -100
            return (torch.randn(5, 8, generator=gen), y, -torch.rand(1, 5, generator=gen),
                    torch.randn(1, generator=gen))

        loss = model(*batch(rank))
        loss.backward()
        want = plain(*batch(rank))
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
        want.backward()
        for r in range(world):  # the mean over the ranks' batches
            if r != rank:
                plain(*batch(r)).backward()
        for name, p in model.named_parameters():
            got = p.grad.full_tensor()
            torch.testing.assert_close(got, plain.get_parameter(name).grad / world, rtol=1e-5,
                                       atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    _finish()


def budget_path_case(rank: int, world: int, store_path: str, case: dict) -> None:
    """dw_budget_bytes between two uneven shards' accumulator sizes: every rank takes the same
    path (the whole head decides), for the three gradient-in-forward losses."""
    from prefkern.losses import linear_distill_loss, linear_policy_loss, linear_preference_loss

    _init(rank, world, store_path)
    try:
        gen = torch.Generator().manual_seed(6)
        b, t, h, v = 4, 5, 16, 53  # shards of 27 and 26 rows
        hidden = torch.randn(b, t, h, generator=gen).bfloat16()
        weight = (torch.randn(v, h, generator=gen) * 0.5).bfloat16()
        targets = torch.randint(0, v, (b, t), generator=gen)
        start, stop = shard_bounds(v, world, rank)
        budget = 4 * 27 * h - 1  # rank 0's shard does not fit it, rank 1's does
        group = dict(process_group=dist.group.WORLD)
        fns = {
            "policy": lambda hs, ws: linear_policy_loss(
                hs, ws, targets, -torch.ones(b, t), torch.ones(b), dw_budget_bytes=budget,
                backend="torch", **group),
            "preference": lambda hs, ws: linear_preference_loss(
                hs, ws, targets, ref_logps=(torch.zeros(2), torch.zeros(2)),
                dw_budget_bytes=budget, backend="torch", **group),
            "distill": lambda hs, ws: linear_distill_loss(
                hs, ws, hidden.float().bfloat16(), weight[start:stop], targets,
                dw_budget_bytes=budget, backend="torch", **group),
        }
        for name, fn in fns.items():
            hs = hidden.clone().requires_grad_(True)
            ws = weight[start:stop].clone().requires_grad_(True)
            loss, _ = fn(hs, ws)
            fused = torch.tensor([float(type(loss.grad_fn).__name__.startswith(
                "GradientInForward"))])
            flags = [torch.zeros(1) for _ in range(world)]
            dist.all_gather(flags, fused)
            assert all(f.item() == 0.0 for f in flags), f"{name}: paths {flags}"
            loss.backward()
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    _finish()


def fsdp2_causal_lm_case(rank: int, world: int, store_path: str, case: dict) -> None:
    """causal_lm_logprobs (and a model patched by apply_prefkern) on a transformers model
    wrapped the way FSDP2 trainers wrap it (fully_shard on every decoder layer, then on the
    root, whose own shards hold the embeddings, final norm and head), from the very first call
    (no forward before it): values equal the plain model's, and each parameter's reduce-
    scattered gradient is the mean of the ranks' plain ones (none left unreduced)."""
    import transformers
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from prefkern.integrations.transformers import apply_prefkern, causal_lm_logprobs

    _init(rank, world, store_path)
    try:
        torch.manual_seed(0)
        config = transformers.Qwen2Config(
            vocab_size=67, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
            tie_word_embeddings=case.get("tied", False))
        model = transformers.Qwen2ForCausalLM(config).eval()
        with torch.no_grad():
            model.lm_head.weight.normal_(0, 0.5)
        plain = transformers.Qwen2ForCausalLM(config).eval()
        plain.load_state_dict(model.state_dict())
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)

        def batch(r):
            gen = torch.Generator().manual_seed(20 + r)
            ids = torch.randint(0, 67, (2, 7), generator=gen)
            mask = torch.ones_like(ids)
            mask[1, -2:] = 0
            return ids, mask, torch.randn(2, 6, generator=gen)

        def loss_of(m, r, patched):
            ids, mask, g = batch(r)
            if patched:
                labels = torch.where(mask.bool(), ids, -100)
                return m(input_ids=ids, attention_mask=mask, labels=labels).loss
            return (causal_lm_logprobs(m, ids, mask, backend="torch") * g).sum()

        patched = case.get("patched", False)
        if patched:
            apply_prefkern(model)
            apply_prefkern(plain)
        for step in range(2):  # the first call, then one after a reshard
            got = loss_of(model, rank, patched)
            got.backward()
            plain.zero_grad()
            for r in range(world):
                want = loss_of(plain, r, patched)
                if r == rank:
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
                want.backward()
            for name, p in model.named_parameters():
                assert p.grad is not None, f"step {step}: {name} got no gradient"
                torch.testing.assert_close(
                    p.grad.full_tensor(), plain.get_parameter(name).grad / world, rtol=1e-5,
                    atol=1e-6, msg=lambda m, name=name, step=step: f"step {step}: {name}: {m}")
            model.zero_grad()
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    _finish()


def group_losses_case(rank: int, world: int, store_path: str, case: dict) -> None:
    """GVPO and DisCO on each rank's slice of a batch whose prompts span the ranks: the shares
    sum over the ranks to the whole batch's loss, and each rank's gradient is the whole loss's
    gradient on its rows (float64); the metrics are the whole batch's."""
    from prefkern.losses import disco_loss, gvpo_loss

    _init(rank, world, store_path)
    try:
        gen = torch.Generator().manual_seed(8)
        b, t = 5 * world, 6
        mine = slice(rank * 5, rank * 5 + 5)
        ids = torch.arange(b) % 3 * 10 - 4  # 3 prompts, each on every rank
        rewards = torch.randint(0, 2, (b,), generator=gen).double()
        rewards[ids == 6] = 1.0  # one prompt with positives only
        logp = -torch.rand(b, t, generator=gen, dtype=torch.float64) * 2
        old = logp + 0.05 * torch.randn(b, t, generator=gen, dtype=torch.float64)
        mask = torch.rand(b, t, generator=gen) < 0.8
        mask[:, 0] = True

        def check(name, fn, *, reduced=True):
            x = logp.clone().requires_grad_(True)
            whole, whole_metrics = fn(x, slice(None), None)
            whole.backward()
            y = logp[mine].clone().requires_grad_(True)
            part, metrics = fn(y, mine, dist.group.WORLD)
            part.backward()
            total = part.detach().clone()
            dist.all_reduce(total)
            torch.testing.assert_close(total, whole.detach(), msg=name)  # fp32 outputs
            torch.testing.assert_close(y.grad, x.grad[mine], rtol=1e-6, atol=1e-9, msg=name)
            for key in metrics if reduced else ():
                torch.testing.assert_close(metrics[key], whole_metrics[key], msg=f"{name} {key}")

        for reduction in ("sum", "mean"):
            check(f"gvpo {reduction}", lambda x, rows, group, reduction=reduction: gvpo_loss(
                (x * mask[rows]).sum(-1), (old[rows] * mask[rows]).sum(-1), rewards[rows],
                ids[rows], beta=0.2, reduction=reduction, process_group=group), reduced=False)
        for score in ("log_l", "l_ratio"):
            for tau in (None, 0.5):
                check(f"disco {score} {tau}",
                      lambda x, rows, group, score=score, tau=tau: disco_loss(
                          x, old[rows], mask[rows], rewards[rows], ids[rows], score=score,
                          tau=tau, beta=100.0, delta=1e-6, kl_kind="k3", process_group=group))
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    _finish()


def tensor_parallel_head_case(rank: int, world: int, store_path: str, case: dict) -> None:
    """A head parallelized with torch's ColwiseParallel: through the module's call (head_call /
    head_logprobs) a clear error, since TP's output hook would re-shard the per-token results;
    the direct call with the TP group equals the plain head, values and gradients."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from prefkern import linear_logprobs
    from prefkern.integrations.transformers import head_logprobs

    _init(rank, world, store_path)
    try:
        torch.manual_seed(0)
        head = torch.nn.Linear(8, 11, bias=False)
        plain = torch.nn.Linear(8, 11, bias=False)
        plain.load_state_dict(head.state_dict())
        mesh = init_device_mesh("cpu", (world,))
        parallelize_module(head, mesh, ColwiseParallel())
        gen = torch.Generator().manual_seed(1)
        x, y = torch.randn(5, 8, generator=gen), torch.randint(0, 11, (5,), generator=gen)
        try:
            head_logprobs(head, x, y, backend="torch")
        except ValueError as err:
            assert "tensor parallel" in str(err) and "process_group" in str(err), err
        else:
            raise AssertionError("a tensor-parallel head ran through its module's call")
        singletons = [dist.new_group([r]) for r in range(world)]
        try:  # a group other than the weight's mesh: the shards are not its vocabulary split
            linear_logprobs(x, head.weight, y, process_group=singletons[rank], backend="torch")
        except ValueError as err:
            assert "mesh group" in str(err), err
        else:
            raise AssertionError("a DTensor head ran vocab-parallel on another group")
        got = linear_logprobs(x, head.weight, y, process_group=mesh.get_group(),
                              backend="torch")
        want = linear_logprobs(x, plain.weight, y, backend="torch")
        torch.testing.assert_close(got, want)
        got.sum().backward()
        want.sum().backward()
        torch.testing.assert_close(head.weight.grad.full_tensor(), plain.weight.grad)
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    _finish()
