"""Losses on top of the primitives: cheap functions of per-token log-probs and divergences
that never re-implement the log-prob math. Each returns (loss, metrics), metrics detached."""

from prefkern.losses.disco import disco_loss
from prefkern.losses.distill import distill_loss, linear_distill_loss, topk_forward_kl
from prefkern.losses.group_regression import astar_po_loss, astar_values, dro_loss, gvpo_loss
from prefkern.losses.linear_preference import linear_preference_loss
from prefkern.losses.listwise import (
    irepo_loss,
    lipo_lambda_loss,
    pro_loss,
    set_bt_loss,
    sppo_loss,
)
from prefkern.losses.policy import (
    aggregate,
    global_normalizer,
    linear_policy_loss,
    policy_loss,
    policy_preset,
    value_loss,
)
from prefkern.losses.preference import (
    cpo_loss,
    orpo_loss,
    preference_loss,
    tdpo_loss,
    unpaired_loss,
)
from prefkern.losses.reduction import REDUCTIONS, reduce_tokens
from prefkern.losses.rollout_correction import rollout_is_weights
from prefkern.losses.sequence import (
    ld_sequence_logps,
    ld_token_sums,
    sequence_reduce,
    token_sums,
    wpo_weights,
)
from prefkern.losses.token_selection import high_entropy_mask

__all__ = ["REDUCTIONS", "aggregate", "astar_po_loss", "astar_values", "disco_loss", "dro_loss",
           "gvpo_loss", "global_normalizer", "cpo_loss", "distill_loss", "irepo_loss",
           "ld_sequence_logps", "ld_token_sums", "linear_distill_loss", "linear_policy_loss",
           "linear_preference_loss",
           "lipo_lambda_loss", "orpo_loss", "policy_loss", "policy_preset", "preference_loss",
           "pro_loss",
           "reduce_tokens", "rollout_is_weights", "high_entropy_mask", "sequence_reduce",
           "set_bt_loss",
           "sppo_loss", "tdpo_loss", "token_sums",
           "topk_forward_kl", "unpaired_loss", "value_loss", "wpo_weights"]
