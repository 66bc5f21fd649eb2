"""A plain PyTorch PPO step with prefkern: GAE on the rollout, then the clipped policy loss and
the value loss from the hidden states and the LM head, without the (B, T, V) logits.

    python examples/ppo_step.py [--steps 3] [--device cpu]

A tiny causal LM built from a config (random weights, no downloads) plays the policy; a linear
value head on its hidden states plays the critic; rewards are a rule on the sampled tokens.
"""

from __future__ import annotations

import argparse

import torch

import prefkern
from prefkern.bench.profile import PRESETS, TinyCausalLM


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    cfg = PRESETS["micro"]
    device = torch.device(args.device)
    policy = TinyCausalLM(cfg).to(device)
    critic = torch.nn.Linear(cfg.hidden, 1).to(device)
    params = [*policy.parameters(), *critic.parameters()]
    optim = torch.optim.AdamW(params, lr=1e-3)
    loss_fn = prefkern.nn.LinearPolicyLoss(loss_type="ppo", eps_low=0.2, eps_high=0.28,
                                          agg="token-mean")
    batch, prompt, length = 8, 16, 48
    for step in range(args.steps):
        # rollout: sample a completion token by token (no KV cache: a tiny model)
        ids = torch.randint(0, cfg.vocab, (batch, prompt), device=device)
        with torch.no_grad():
            for _ in range(length - prompt):
                hidden = policy(ids)[:, -1]
                probs = (hidden @ policy.lm_head.weight.T).softmax(-1)
                ids = torch.cat([ids, torch.multinomial(probs, 1)], dim=1)
            hidden = policy(ids[:, :-1])
            targets = ids[:, 1:].clone()
            targets[:, : prompt - 1] = -100  # the prompt is not scored
            mask = targets != -100
            old_logprobs = prefkern.linear_logprobs(hidden, policy.lm_head.weight, targets)
            values = critic(hidden).squeeze(-1) * mask
            # a rule-based reward at the last token: the share of even token ids
            score = (targets.remainder(2) == 0).logical_and(mask).float().sum(-1) / mask.sum(-1)
            rewards = torch.zeros_like(values)
            rewards[:, -1] = score
            advantages, returns = prefkern.gae(rewards, values, mask, gamma=1.0, lam=0.95,
                                               whiten=True)
        # update: the policy loss from hidden states (no logits) plus the value loss
        hidden = policy(ids[:, :-1])
        pg_loss, metrics = loss_fn(hidden, policy.lm_head.weight, targets, old_logprobs,
                                   advantages, mask)
        new_values = critic(hidden).squeeze(-1)
        v_loss, _ = prefkern.losses.value_loss(new_values, values, returns, mask, clip=0.2)
        loss = pg_loss + 0.5 * v_loss
        optim.zero_grad()
        loss.backward()
        optim.step()
        print(f"step {step}: reward {score.mean():.3f}  policy loss {pg_loss.item():+.4f}  "
              f"value loss {v_loss.item():.4f}  clipfrac {metrics['pg_clipfrac']:.3f}")


if __name__ == "__main__":
    main()
