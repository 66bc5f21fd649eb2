"""Vocab-parallel linear_logprobs over torch.distributed (gloo, 2 and 3 CPU processes): each
rank's shard gives the single-device results, values and every gradient (the comparison rule
against float64), uneven shards, targets in other shards, ignored tokens, entropy without
targets, the extra statistics."""

from __future__ import annotations

import distributed_workers as workers
import pytest
import torch
import torch.multiprocessing as mp


def _spawn(fn, world: int, case: dict, tmp_path) -> None:
    mp.spawn(fn, args=(world, str(tmp_path / "store"), case), nprocs=world, join=True)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", [
    dict(backend="torch", bias=True, softcap=6.0, row_temp=True, stats=True),
    dict(backend="torch", no_targets=True, given=True),
    dict(backend="torch", dtype=torch.bfloat16, bias=True),
    dict(backend="triton", mode="fast", bias=True, softcap=6.0, stats=True),
    dict(backend="triton", mode="min_memory", row_temp=True),
    dict(backend="torch", k=4, bias=True, softcap=6.0, stats=True),
    dict(backend="triton", mode="fast", k=3, row_temp=True),
    dict(backend="triton", mode="min_memory", ignore_index=3, k=2),
], ids=["torch-all", "torch-no-targets", "torch-bf16", "triton-fast", "triton-minmem",
        "torch-k-targets", "triton-k-targets", "triton-minmem-ignore3-k"])
def test_linear_logprobs_sharded_equals_single_device(world, case, tmp_path):
    _spawn(workers.linear_logprobs_case, world, dict(n=17, h=24, v=101, **case), tmp_path)


def test_bad_targets_are_checked_against_the_full_vocabulary():
    """A target id valid in the full vocabulary but past this shard is accepted; one past the
    full vocabulary raises, before any collective (vocab_start / vocab_size given)."""
    import prefkern

    hidden, weight = torch.randn(3, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match=r"\[0, 12\)"):
        prefkern.linear_logprobs(hidden, weight, torch.tensor([1, 12, 3]),
                                 process_group=object(), vocab_start=5, vocab_size=12,
                                 backend="torch")


@pytest.mark.parametrize("how,vocab_parallel,replicated_bias", [
    ("rows", True, False), ("rows", True, True), ("rows", False, False), ("cols", False, False),
    ("replicate", False, False)])
def test_dtensor_head(how, vocab_parallel, replicated_bias, tmp_path):
    """replicated_bias: a row-sharded weight with a replicated bias, whose gradient each rank
    forms on its own rows only (their sum is the bias's gradient)."""
    _spawn(workers.dtensor_head_case, 2,
           dict(n=9, h=16, v=37, bias=True, how=how, vocab_parallel=vocab_parallel,
                replicated_bias=replicated_bias), tmp_path)


def test_fsdp_style_row_shards_are_gathered(tmp_path):
    _spawn(workers.fsdp_style_head_case, 2, dict(n=7, h=16, v=37), tmp_path)


@pytest.mark.parametrize("world", [2, 3])
def test_data_parallel_whitening_and_normalizers(world, tmp_path):
    _spawn(workers.data_parallel_case, world, {}, tmp_path)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", [
    dict(backend="torch", kind="forward_kl", row_temp=True, softcap=5.0),
    dict(backend="torch", kind="jsd"),
    dict(backend="torch", kind="alpha"),
    dict(backend="torch", kind="tv"),
    dict(backend="triton", kind="reverse_kl", row_temp=True),
    dict(backend="triton", kind="jsd", ignore_index=3),
], ids=["torch-fkl", "torch-jsd", "torch-alpha", "torch-tv", "triton-rkl", "triton-jsd-ignore3"])
def test_linear_divergence_sharded_equals_single_device(world, case, tmp_path):
    _spawn(workers.linear_divergence_case, world, dict(n=13, h=16, v=61, bias=True, **case),
           tmp_path)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", [
    dict(backend="torch", fused=True, softcap=4.0, row_temp=True),
    dict(backend="torch", fused=False),
    dict(backend="triton", fused=True, row_temp=True),
], ids=["torch-fused", "torch-two-pass", "triton-fused"])
def test_losses_on_vocab_shards(world, case, tmp_path):
    _spawn(workers.losses_case, world, case, tmp_path)


@pytest.mark.parametrize("case", [
    dict(backend="torch", fused=True, ignore_index=3),
    dict(backend="triton", fused=True, ignore_index=3),
    dict(backend="triton", fused=False, ignore_index=3),
], ids=["torch-fused", "triton-fused", "triton-two-pass"])
def test_losses_on_vocab_shards_with_a_nonnegative_ignore_index(case, tmp_path):
    """ignore_index = 3: a real target whose shard-local id is 3 must still count."""
    _spawn(workers.losses_case, 2, case, tmp_path)


@pytest.mark.parametrize("world", [2, 3])
def test_verl_vocab_parallel_linear_cross_entropy(world, tmp_path):
    _spawn(workers.verl_linear_cross_entropy_case, world, {}, tmp_path)


@pytest.mark.parametrize("what", ["logprobs", "fused-policy-loss"])
def test_fsdp2_wrapped_model(what, tmp_path):
    _spawn(workers.fsdp2_model_case, 2, {"what": what}, tmp_path)


def test_tensor_parallel_head(tmp_path):
    _spawn(workers.tensor_parallel_head_case, 2, {}, tmp_path)


@pytest.mark.parametrize("world", [2, 3])
def test_group_losses_over_data_parallel_ranks(world, tmp_path):
    _spawn(workers.group_losses_case, world, {}, tmp_path)


@pytest.mark.parametrize("case", [{}, {"tied": True}, {"patched": True}],
                         ids=["causal_lm_logprobs", "tied-head", "apply_prefkern"])
def test_fsdp2_wrapped_causal_lm(case, tmp_path):
    pytest.importorskip("transformers")
    _spawn(workers.fsdp2_causal_lm_case, 2, case, tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one GPU per rank (>= 2)")
@pytest.mark.parametrize("backend,mode", [("triton", "fast"), ("triton", "min_memory"),
                                          ("torch", "auto")])
def test_nccl_sharded_equals_single_device(backend, mode, tmp_path):
    """The same check over NCCL, one GPU per rank (run on a machine with >= 2 GPUs:
    ``pytest -m gpu tests/test_vocab_parallel.py``)."""
    world = min(torch.cuda.device_count(), 4)
    _spawn(workers.linear_logprobs_case, world,
           dict(n=33, h=64, v=1001, backend=backend, mode=mode, bias=True, softcap=6.0,
                dtype=torch.bfloat16, stats=True, nccl=True), tmp_path)


def test_dw_budget_takes_the_same_path_on_every_rank(tmp_path):
    _spawn(workers.budget_path_case, 2, {}, tmp_path)
