"""prefkern: fused kernels for the loss side of LLM alignment training.

Never imports transformers/trl/verl; Triton and the CUDA extension load lazily on first use.
"""

from prefkern import (
    _torch_floor,  # noqa: F401  (first: a clear error on a too old torch)
    integrations,
    losses,
    nn,
    reference,
)
from prefkern._checks import raise_on_bad_input
from prefkern.dispatch import BACKENDS, BackendUnavailable, available_backends
from prefkern.ops.gae import gae
from prefkern.ops.group_advantages import group_advantages
from prefkern.ops.kl_estimate import kl_estimate
from prefkern.ops.linear_divergence import linear_divergence
from prefkern.ops.linear_logprobs import linear_logprobs
from prefkern.ops.logits_divergence import logits_divergence
from prefkern.ops.logprobs_from_logits import entropy_from_logits, logprobs_from_logits
from prefkern.ops.reward_shaping import RunningMoments, kl_penalized_rewards, normalize_rewards
from prefkern.outputs import (
    DivergenceOutput,
    HeadOutput,
    HeadStats,
    LinearLogprobsOutput,
    LogprobsEntropy,
)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "DivergenceOutput",
    "HeadOutput",
    "HeadStats",
    "LinearLogprobsOutput",
    "LogprobsEntropy",
    "RunningMoments",
    "available_backends",
    "entropy_from_logits",
    "gae",
    "integrations",
    "losses",
    "group_advantages",
    "kl_estimate",
    "kl_penalized_rewards",
    "linear_divergence",
    "linear_logprobs",
    "logits_divergence",
    "logprobs_from_logits",
    "normalize_rewards",
    "raise_on_bad_input",
    "nn",
    "reference",
]
