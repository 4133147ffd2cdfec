"""The arithmetic of PPO for language models, as pure torch functions.

Every tensor is (batch, response_len) unless stated, paired with a response `mask` (1 for real response tokens,
0 for padding after the first EOS). Padding always sits at the right of a response, so the last real token of a
row is its EOS (or the last generated token when the row hit the length limit).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum()


def masked_mean(values: torch.Tensor, mask: torch.Tensor,
                num_tokens: float | torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the real tokens. `num_tokens` replaces the mask's count as the denominator: a micro-batch then
    contributes its share of a larger batch's mean, which makes gradient accumulation exact."""
    denominator = mask.sum() if num_tokens is None else num_tokens
    return masked_sum(values, mask) / denominator


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over the real tokens; `unbiased` applies Bessel's correction (needs at least two real tokens)."""
    count = mask.sum()
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        if count < 2:
            raise ValueError("masked_var: unbiased variance needs at least two real tokens in the mask")
        var = var * count / (count - 1)
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Scale to unit variance over the real tokens; also centre to zero mean when `shift_mean` (advantages).

    `reduce_sum` (a sum over processes) takes the mean and variance over the tokens of every process, so N
    processes whiten exactly as one process holding all their rows would. Padding positions come back as 0 so
    they cannot leak into later sums.
    """
    if reduce_sum is None:
        mean, var = masked_mean(values, mask), masked_var(values, mask)
    else:
        count = reduce_sum(mask.sum().to(values.dtype))
        if count < 2:
            raise ValueError("masked_whiten: unbiased variance needs at least two real tokens over all processes")
        mean = reduce_sum(masked_sum(values, mask)) / count
        var = reduce_sum(masked_sum((values - mean) ** 2, mask)) / count * count / (count - 1)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the log-probs of the sampled tokens.

    k1 = log p - log p_ref (unbiased, can be negative); k3 = (r - 1) - log r with r = p_ref / p (unbiased, never
    negative, lower variance; Schulman's "Approximating KL divergence").
    """
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kl_estimate: kind must be 'k1' or 'k3', got {kind!r}")


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences").

    After each rollout of `n_steps` samples whose mean KL was `current_kl`, the coefficient is multiplied by
    1 + clip(current_kl / target - 1, -0.2, 0.2) * n_steps / horizon: it grows while the policy drifts too far.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"AdaptiveKLController: target ({target}) and horizon ({horizon}) must be positive")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = float(state["value"]), float(state["target"]), int(state["horizon"])


def truncate_after_eos(response_ids: torch.Tensor, eos_id: int | Sequence[int],
                       pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad every token after a row's first EOS; the EOS itself stays (it is an action the policy took). `eos_id`
    may list several stop tokens (a chat template's end-of-turn token and eos): the first of any ends the row.

    Returns (ids, mask, has_eos): ids with `pad_id` after the first EOS, mask 1 up to and including it, and a bool
    per row telling whether an EOS was generated at all (rows without one ran into the length limit).
    """
    is_eos = torch.isin(response_ids, torch.as_tensor(eos_id, device=response_ids.device))
    eos_seen_before = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0  # strictly before this position
    mask = (~eos_seen_before).long()
    ids = response_ids.masked_fill(eos_seen_before, pad_id)
    return ids, mask, is_eos.any(dim=1)


def apply_missing_eos_penalty(scores: torch.Tensor, has_eos: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """Subtract `penalty` (a positive number) from the score of every row that never emitted EOS."""
    if penalty is None:
        return scores
    if penalty < 0:
        raise ValueError(f"missing_eos_penalty={penalty}: it is subtracted from the score, pass a positive number")
    return torch.where(has_eos, scores, scores - penalty)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token (0 for a row with none)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (positions * mask.long()).argmax(dim=1)


def after_eos_mask(mask: torch.Tensor) -> torch.Tensor:
    """`mask` plus one position after each row's last real token where the response has room for it: the state after
    EOS, where TRL's former PPOTrainer put the score and trained the value model (rows that ran to the length limit
    keep their mask)."""
    rows = torch.arange(mask.shape[0], device=mask.device)
    after = last_token_index(mask) + 1
    room = (after < mask.shape[1]) & (mask.sum(1) > 0)
    extended = mask.clone()
    extended[rows[room], after[room]] = 1
    return extended


def token_level_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token reward: -kl_coef * kl on every position of `mask`, plus the sequence score on its last one (the EOS;
    the state after it when `mask` comes from `after_eos_mask`, where `kl` is 0)."""
    rewards = -kl_coef * kl * mask
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), walking the response backwards.

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}, where V and A beyond the
    mask are 0 (the episode ended). Returns (advantages, returns = advantages + values), both 0 beyond the mask.
    """
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    length = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(length)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value, next_advantage = values[:, t], advantages[:, t]
    returns = (advantages + values) * mask
    return advantages, returns


def clipped_policy_loss(new_logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, clip_range: float, num_tokens: float | torch.Tensor | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate: mean of max(-A * ratio, -A * clip(ratio, 1 - c, 1 + c)).

    Returns (loss, clipfrac = share of tokens where the clipped term won, approx_kl = mean 0.5 * (log ratio)^2).
    `num_tokens` as in `masked_mean` (only the loss uses it; the statistics stay per micro-batch).
    """
    log_ratio = new_logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask, num_tokens)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(0.5 * log_ratio**2, mask)
    return loss, clipfrac, approx_kl


def clipped_value_loss(new_values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       clip_range_value: float, num_tokens: float | torch.Tensor | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 * mean of max((V - R)^2, (V_clipped - R)^2), V_clipped = V_old + clip(V - V_old, -c, c).

    Returns (loss, clipfrac = share of tokens where the clipped error was the larger).
    """
    clipped_values = old_values + torch.clamp(new_values - old_values, -clip_range_value, clip_range_value)
    unclipped_error = (new_values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask, num_tokens)
    with torch.no_grad():
        clipfrac = masked_mean((clipped_error > unclipped_error).float(), mask)
    return loss, clipfrac


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position: (..., vocab) -> (...)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return -(logprobs.exp() * logprobs).sum(dim=-1)


def logprobs_of(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Log-probability of each chosen token: logits (B, T, V), token_ids (B, T) -> (B, T)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return logprobs.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)


__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "after_eos_mask",
    "apply_missing_eos_penalty",
    "clipped_policy_loss",
    "clipped_value_loss",
    "compute_gae",
    "entropy_from_logits",
    "kl_estimate",
    "last_token_index",
    "logprobs_of",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "token_level_rewards",
    "truncate_after_eos",
]
