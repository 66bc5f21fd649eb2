"""DeepSpeed ZeRO-3 (2 CPU processes, gloo): prefkern's ops run inside the LM head module's
call (prefkern.integrations.transformers.head_call / head_logprobs), where DeepSpeed's own hooks
gather the partitioned weight for the forward and again for the backward; a gradient-in-forward
loss hands its dW to the partitioned parameter that way. Skipped where deepspeed is not
installed (the test extra installs it)."""

from __future__ import annotations

import distributed_workers as workers
import pytest
import torch.multiprocessing as mp

pytest.importorskip("deepspeed")


@pytest.mark.parametrize("case", [dict(what="logprobs"), dict(what="policy", bias=True)],
                         ids=["head_logprobs", "fused-policy-loss"])
def test_zero3_partitioned_head_equals_a_plain_model(case, tmp_path):
    mp.spawn(workers.deepspeed_zero3_case, args=(2, str(tmp_path / "store"), case), nprocs=2,
             join=True)
