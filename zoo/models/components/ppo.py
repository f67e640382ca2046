"""PPO's arithmetic for a language model, as trl 1.12.0's ``PPOTrainer`` computes it (the last
TRL release that has it, ``trl.experimental.ppo``), as plain functions of tensors.

Shapes: ``B`` responses of ``T`` tokens. ``lengths`` [B] counts each response's real tokens
(through its stop token); TRL's ``sequence_lengths`` is ``lengths - 1``, the index of the last
real token. Masks come from ``lengths``, never from pad ids, so pad may equal EOS.

Where TRL has a defect, the callers here do better (see ``zoo.models.rlhf``): the rollout's
log-probs come from the same computation as the update's, so the ratio is exactly 1 at the first
update; ``tests/test_rlhf_trl_parity.py`` checks these functions against TRL's own trainer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INVALID_LOGPROB = 1.0  # TRL's fill for log-probs past a response's end


def first_true_indices(bools: torch.Tensor) -> torch.Tensor:
    """The index of each row's first True ([B, T] -> [B]); T where a row has none."""
    t = bools.shape[-1]
    idx = torch.arange(t, device=bools.device)
    return torch.where(bools, idx, t).min(-1).values


def truncate_after_stop(
    responses: torch.Tensor, stop_token_id: int | None, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Responses with everything after the first stop token set to pad, and their lengths
    (the stop token counts; a response without one keeps all ``T`` tokens)."""
    t = responses.shape[1]
    if stop_token_id is None:
        return responses, torch.full((responses.shape[0],), t, device=responses.device)
    first = first_true_indices(responses == stop_token_id)
    lengths = torch.clamp(first + 1, max=t)
    idx = torch.arange(t, device=responses.device)
    return responses.masked_fill(idx[None] >= lengths[:, None], pad_token_id), lengths


def masked_mean(values: torch.Tensor, mask: torch.Tensor, axis: int | None = None):
    if axis is not None:
        return (values * mask).sum(axis=axis) / mask.sum(axis=axis)
    return (values * mask).sum() / mask.sum()


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True):
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = mask.sum()
        if count <= 1:
            raise ValueError(
                f"whitening needs at least 2 unmasked values, got {int(count)}: use more "
                "responses per minibatch"
            )
        variance = variance * (count / (count - 1))  # TRL's rounding: its Bessel factor first
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True):
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


@dataclass
class Masks:
    """TRL's two masks: ``padding`` (past the last real token: log-probs, advantages, the
    policy loss) and ``padding_p1`` (one further: values, the value loss; the score sits at
    the first padded position)."""

    padding: torch.Tensor
    padding_p1: torch.Tensor
    sequence_lengths: torch.Tensor  # TRL's: index of the last real token

    @classmethod
    def from_lengths(cls, lengths: torch.Tensor, t: int) -> Masks:
        seq = lengths.long() - 1
        idx = torch.arange(t, device=lengths.device)[None]
        return cls(idx > seq[:, None], idx > (seq + 1)[:, None], seq)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str):
    """Per-token KL(policy || reference) of the sampled tokens: k1 (``logp - ref``) or k3
    (``exp(r) - 1 - r`` with ``r = ref - logp``), as in http://joschu.net/blog/kl-approx.html."""
    logr = ref_logprobs - logprobs
    if estimator == "k1":
        return -logr
    if estimator == "k3":
        return (logr.exp() - 1) - logr
    raise ValueError(f"kl_estimator={estimator!r}: expected k1 or k3")


def rewards_and_advantages(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    scores: torch.Tensor,
    masks: Masks,
    kl_coef: float,
    kl_estimator: str = "k1",
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten_rewards: bool = False,
) -> dict[str, torch.Tensor]:
    """KL-penalised per-token rewards (the score added after the last real token), GAE
    advantages (whitened over real tokens) and returns, from a rollout whose log-probs and
    values are already masked (``mask_rollout``)."""
    kl = kl_estimate(logprobs, ref_logprobs, kl_estimator)
    non_score_reward = -kl_coef * kl
    rewards = non_score_reward.clone()
    b, t = rewards.shape
    seq_p1 = masks.sequence_lengths + 1
    end = torch.where(seq_p1 < t, seq_p1, masks.sequence_lengths)
    rewards[torch.arange(b, device=rewards.device), end] += scores
    if whiten_rewards:
        rewards = masked_whiten(rewards, ~masks.padding_p1, shift_mean=False)
        rewards = rewards.masked_fill(masks.padding_p1, 0)
    lastgaelam = torch.zeros(b, dtype=rewards.dtype, device=rewards.device)
    reversed_ = []
    for i in reversed(range(t)):
        nextvalues = values[:, i + 1] if i < t - 1 else 0.0
        delta = rewards[:, i] + gamma * nextvalues - values[:, i]
        lastgaelam = delta + gamma * lam * lastgaelam
        reversed_.append(lastgaelam)
    advantages = torch.stack(reversed_[::-1], 1)
    returns = advantages + values
    advantages = masked_whiten(advantages, ~masks.padding)
    advantages = advantages.masked_fill(masks.padding, 0)
    return {
        "kl": kl,
        "non_score_reward": non_score_reward,
        "rewards": rewards,
        "advantages": advantages,
        "returns": returns,
    }


def mask_rollout(logprobs, ref_logprobs, values, masks: Masks):
    """TRL's fills: log-probs past the end to ``INVALID_LOGPROB``, values past end+1 to 0."""
    return (
        logprobs.masked_fill(masks.padding, INVALID_LOGPROB),
        ref_logprobs.masked_fill(masks.padding, INVALID_LOGPROB),
        values.masked_fill(masks.padding_p1, 0),
    )


def ppo_losses(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    vpred: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    padding: torch.Tensor,
    padding_p1: torch.Tensor,
    cliprange: float = 0.2,
    cliprange_value: float = 0.2,
) -> dict[str, torch.Tensor]:
    """The clipped actor loss and clipped critic loss of one micro-batch, and TRL's statistics
    of it (``approxkl``, ``pg_clipfrac``, ``vf_clipfrac``, ``ratio``)."""
    new_logprobs = new_logprobs.masked_fill(padding, INVALID_LOGPROB)
    vpred = vpred.masked_fill(padding_p1, 0)
    vpredclipped = torch.clamp(vpred, old_values - cliprange_value, old_values + cliprange_value)
    vf_losses1 = torch.square(vpred - returns)
    vf_losses2 = torch.square(vpredclipped - returns)
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), ~padding_p1)
    logprobs_diff = new_logprobs - old_logprobs
    ratio = torch.exp(logprobs_diff)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), ~padding)
    with torch.no_grad():
        stats = {
            "vf_clipfrac": masked_mean((vf_losses2 > vf_losses1).float(), ~padding_p1),
            "pg_clipfrac": masked_mean((pg_losses2 > pg_losses).float(), ~padding),
            "approxkl": 0.5 * (logprobs_diff**2).mean(),
            "ratio": ratio.mean(),
        }
    return {"pg_loss": pg_loss, "vf_loss": vf_loss, **stats}


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of the distributions ``logits`` [..., V] (temperature-scaled, as
    the update's) -> [...], as TRL computes it: ``logsumexp - sum(softmax * logits)``. TRL's
    ``policy/entropy_avg`` takes each micro-batch's mean over every position, padding included."""
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(-1)


def step_statistics(
    kl: torch.Tensor,
    logprobs: torch.Tensor,
    non_score_reward: torch.Tensor,
    scores: torch.Tensor,
    masks: Masks,
    per_update: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """TRL's logged statistics of one PPO step (before the ``gather`` across ranks), under its
    names; ``per_update`` holds each statistic over the step's (epoch, minibatch, micro-batch)
    updates: approxkl, pg_clipfrac, pg_loss, vf_loss, vf_clipfrac, ratio (``ppo_losses``) and
    entropy (``entropy(logits).mean()``)."""
    mean_non_score = non_score_reward.sum(1).mean()
    return {
        "objective/kl": kl.sum(1).mean(),
        "objective/entropy": ((-logprobs) * (~masks.padding).float()).sum(1).mean(),
        "objective/non_score_reward": mean_non_score,
        "objective/rlhf_reward": mean_non_score + scores.mean(),
        "objective/scores": scores.mean(),
        "policy/approxkl_avg": per_update["approxkl"].mean(),
        "policy/clipfrac_avg": per_update["pg_clipfrac"].mean(),
        "loss/policy_avg": per_update["pg_loss"].mean(),
        "loss/value_avg": per_update["vf_loss"].mean(),
        "val/clipfrac_avg": per_update["vf_clipfrac"].mean(),
        "policy/entropy_avg": per_update["entropy"].mean(),
        "val/ratio": per_update["ratio"].mean(),
        "val/ratio_var": per_update["ratio"].var(),
    }
