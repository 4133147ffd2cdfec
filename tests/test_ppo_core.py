"""PPO arithmetic on small tensors whose expected values are worked out by hand in the comments."""

import pytest
import torch

from pipeline.alignment.ppo_core import (
    AdaptiveKLController,
    FixedKLController,
    after_eos_mask,
    apply_missing_eos_penalty,
    clipped_policy_loss,
    clipped_value_loss,
    compute_gae,
    entropy_from_logits,
    kl_estimate,
    masked_mean,
    masked_var,
    masked_whiten,
    token_level_rewards,
    truncate_after_eos,
)


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(torch.as_tensor(actual).float(), torch.tensor(expected).float(), atol=atol, rtol=0)


def test_gae_walks_backwards_and_stops_at_the_mask():
    rewards = torch.tensor([[0.0, 1.0, 5.0], [0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 2.0, 9.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    advantages, returns = compute_gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # row 0, the 5.0 and 9.0 lie beyond the mask:  t=1: delta = 1 + 0.9*0 - 2 = -1, A1 = -1
    #                                               t=0: delta = 0 + 0.9*2 - 0.5 = 1.3, A0 = 1.3 + 0.45*(-1) = 0.85
    # row 1: A2 = 1, A1 = 0 + 0.45*1 = 0.45, A0 = 0.45*0.45 = 0.2025
    close(advantages, [[0.85, -1.0, 0.0], [0.2025, 0.45, 1.0]])
    close(returns, [[1.35, 1.0, 0.0], [0.2025, 0.45, 1.0]])  # A + V, zero beyond the mask


def test_masked_statistics_and_whitening():
    x = torch.tensor([[2.0, 4.0, 6.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    close(masked_mean(x, mask), 4.0)
    close(masked_var(x, mask), 4.0)  # (4 + 0 + 4) / 2
    close(masked_var(x, mask, unbiased=False), 8.0 / 3.0)
    close(masked_whiten(x, mask), [[-1.0, 0.0, 1.0, 0.0]])  # (x - 4) / 2, padding -> 0
    close(masked_whiten(x, mask, shift_mean=False), [[3.0, 4.0, 5.0, 0.0]])  # (x - 4) / 2 + 4
    # A micro-batch divided by the whole batch's token count gives its share: the shares add up to the mean.
    halves = masked_mean(x[:, :2], mask[:, :2], num_tokens=3) + masked_mean(x[:, 2:], mask[:, 2:], num_tokens=3)
    close(halves, 4.0)


def test_kl_estimators():
    logp = torch.log(torch.tensor([0.5, 0.25, 0.3]))
    ref = torch.log(torch.tensor([0.25, 0.5, 0.3]))
    close(kl_estimate(logp, ref, "k1"), [0.693147, -0.693147, 0.0])  # log 2, -log 2, 0
    # r = p_ref / p = 0.5, 2, 1: (r - 1) - log r = -0.5 + 0.693147, 1 - 0.693147, 0
    close(kl_estimate(logp, ref, "k3"), [0.193147, 0.306853, 0.0])
    with pytest.raises(ValueError, match="'k1' or 'k3'"):
        kl_estimate(logp, ref, "k2")


def test_clipped_policy_loss_inside_and_beyond_the_clip():
    ratios = torch.tensor([[1.1, 1.5, 0.5, 0.5, 3.0]])
    old = torch.zeros(1, 5)
    new = torch.log(ratios).requires_grad_(True)
    advantages = torch.tensor([[1.0, 1.0, -2.0, 2.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, clipfrac, approx_kl = clipped_policy_loss(new, old, advantages, mask, clip_range=0.2)
    # per token max(-A r, -A clip(r)): -1.1 (inside), -1.2 (clipped at 1.2), 1.6 (clipped at 0.8), -1.0 (the
    # unclipped term is the larger: a clip never helps the objective); mean = (-1.1 - 1.2 + 1.6 - 1.0) / 4
    close(loss, -0.425)
    close(clipfrac, 0.5)
    # 0.5 * mean(log r)^2 = 0.5 * (0.00908403 + 0.16440195 + 0.48045301 + 0.48045301) / 4
    close(approx_kl, 0.141799)
    loss.backward()
    # d loss / d log r = -A r / 4 where the unclipped term is active, 0 where the clip holds it
    close(new.grad, [[-0.275, 0.0, 0.0, -0.25, 0.0]])


def test_clipped_policy_loss_at_the_clip_edge():
    new = torch.log(torch.tensor([[1.2, 0.8]]))
    loss, _, _ = clipped_policy_loss(new, torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2), 0.2)
    close(loss, 0.5 * (-1.2 + 0.8))  # both terms agree at the edge


def test_clipped_value_loss():
    old = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    new = torch.tensor([[1.2, 2.0, 2.0, -1.0]])
    returns = torch.tensor([[2.0, 3.0, 0.0, 0.5]])
    loss, clipfrac = clipped_value_loss(new, old, returns, torch.ones(1, 4), clip_range_value=0.5)
    # V_clip = 1.2, 1.5, 1.5, -0.5; max of squared errors: 0.64, max(1, 2.25), max(4, 2.25), max(2.25, 1)
    close(loss, 0.5 * (0.64 + 2.25 + 4.0 + 2.25) / 4)  # 1.1425
    close(clipfrac, 0.25)


def test_truncate_after_first_eos():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    truncated, mask, has_eos = truncate_after_eos(ids, eos_id=2, pad_id=0)
    assert truncated.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert has_eos.tolist() == [True, False, True]


def test_score_lands_on_the_eos_token():
    scores = torch.tensor([3.0, -1.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    rewards = token_level_rewards(scores, kl, mask, kl_coef=0.5)
    # -0.5 * kl on real tokens; score added at the last real one (index 1, then index 2)
    close(rewards, [[-0.05, 2.9, 0.0], [-0.25, -0.25, -1.25]])


def test_score_after_eos_is_one_more_state_valued_by_the_critic():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]])
    # one more position after the last real token, where the row has room (row 1 ran to the limit; row 3 is empty)
    assert after_eos_mask(mask).tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]]
    mask = torch.tensor([[1, 1, 0]])
    value_mask = after_eos_mask(mask)
    kl = torch.tensor([[0.1, 0.2, 0.0]])
    values = torch.tensor([[0.5, 1.0, 2.0]])  # 2.0: the critic at the state after EOS (V')
    rewards = token_level_rewards(torch.tensor([3.0]), kl * mask, value_mask, kl_coef=0.5)
    close(rewards, [[-0.05, -0.1, 3.0]])  # the score moves to the state after EOS, which has no KL
    advantages, returns = compute_gae(rewards, values, value_mask, gamma=1.0, lam=0.5)
    # t=2: A = 3 - 2 = 1;  t=1: delta = -0.1 + 2 - 1 = 0.9, A = 0.9 + 0.5*1 = 1.4;
    # t=0: delta = -0.05 + 1 - 0.5 = 0.45, A = 0.45 + 0.5*1.4 = 1.15
    close(advantages, [[1.15, 1.4, 1.0]])
    close(returns, [[1.65, 2.4, 3.0]])  # the critic learns V' -> score
    # With the score on EOS: A1 = -0.1 + 3 - 1 = 1.9, A0 = 0.45 + 0.5*1.9 = 1.4. The difference at token t is
    # lam^(n-1-t) * (1 - lam) * (V' - score): -0.5 at t=1, -0.25 at t=0.
    eos_advantages, _ = compute_gae(token_level_rewards(torch.tensor([3.0]), kl, mask, 0.5), values, mask, 1.0, 0.5)
    close(advantages[:, :2] - eos_advantages[:, :2], [[-0.25, -0.5]])


def test_missing_eos_penalty():
    scores, has_eos = torch.tensor([1.0, 0.5]), torch.tensor([True, False])
    close(apply_missing_eos_penalty(scores, has_eos, 2.0), [1.0, -1.5])
    close(apply_missing_eos_penalty(scores, has_eos, None), [1.0, 0.5])
    with pytest.raises(ValueError, match="positive"):
        apply_missing_eos_penalty(scores, has_eos, -1.0)


def test_kl_controllers():
    adaptive = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=100)
    adaptive.update(current_kl=9.0, n_steps=10)  # error 0.5 clipped to 0.2: x (1 + 0.2 * 10 / 100)
    close(adaptive.value, 0.102)
    adaptive.update(current_kl=5.4, n_steps=10)  # error -0.1: x (1 - 0.1 * 10 / 100)
    close(adaptive.value, 0.10098)
    restored = AdaptiveKLController(1.0, 1.0, 1)
    restored.load_state_dict(adaptive.state_dict())
    assert (restored.value, restored.target, restored.horizon) == (adaptive.value, 6.0, 100)
    fixed = FixedKLController(0.3)
    fixed.update(100.0, 10)
    assert fixed.value == 0.3


def test_entropy_from_logits():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [float(torch.log(torch.tensor(3.0))), 0.0, -1e9, -1e9]])
    # uniform over 4: log 4; p = (0.75, 0.25): 0.75 * 0.287682 + 0.25 * 1.386294
    close(entropy_from_logits(logits), [1.386294, 0.562335])
