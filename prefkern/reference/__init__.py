"""The mathematical spec of every public op, in plain torch.

One ``<op>_ref`` per public op, same signature and outputs as the op, materializing everything
(fp32 math for half inputs, fp64 for fp64 inputs). Tests compare against it, docs cite it.
"""

from prefkern.reference.advantages import (
    gae_ref,
    group_advantages_ref,
    kl_penalized_rewards_ref,
    masked_whiten_ref,
    normalize_rewards_ref,
)
from prefkern.reference.divergence import linear_divergence_ref, logits_divergence_ref
from prefkern.reference.group_losses import (
    astar_po_loss_ref,
    astar_values_ref,
    disco_loss_ref,
    dro_loss_ref,
    gvpo_loss_ref,
)
from prefkern.reference.kl import kl_estimate_ref
from prefkern.reference.logprobs import linear_logprobs_ref, logprobs_from_logits_ref
from prefkern.reference.losses import distill_loss_ref, topk_forward_kl_ref
from prefkern.reference.policy import agg_loss_ref, policy_loss_ref, value_loss_ref
from prefkern.reference.preference import (
    cpo_loss_ref,
    irepo_loss_ref,
    lipo_lambda_loss_ref,
    orpo_loss_ref,
    preference_loss_ref,
    pro_loss_ref,
    set_bt_loss_ref,
    sppo_loss_ref,
    tdpo_loss_ref,
    unpaired_loss_ref,
)

__all__ = ["agg_loss_ref", "astar_po_loss_ref", "astar_values_ref", "cpo_loss_ref",
           "disco_loss_ref", "distill_loss_ref", "dro_loss_ref", "gae_ref", "gvpo_loss_ref",
           "group_advantages_ref", "irepo_loss_ref", "kl_estimate_ref",
           "kl_penalized_rewards_ref", "linear_divergence_ref", "linear_logprobs_ref",
           "lipo_lambda_loss_ref", "logits_divergence_ref", "logprobs_from_logits_ref",
           "masked_whiten_ref", "normalize_rewards_ref", "orpo_loss_ref", "policy_loss_ref",
           "preference_loss_ref", "pro_loss_ref", "set_bt_loss_ref", "sppo_loss_ref",
           "tdpo_loss_ref",
           "topk_forward_kl_ref", "unpaired_loss_ref", "value_loss_ref"]
