"""What TRL no longer ships: our PPO trainer (`PPOConfig`, `PPOTrainer`) and its arithmetic (`ppo_core`).

Reward functions for TRL's GRPO/RLOO live in `pipeline.alignment.rewards`, on-policy DPO pairs in
`pipeline.alignment.on_policy_pairs`.
"""

from .ppo_core import AdaptiveKLController, FixedKLController
from .ppo_trainer import PPOConfig, PPOTrainer, token_values

__all__ = ["AdaptiveKLController", "FixedKLController", "PPOConfig", "PPOTrainer", "token_values"]
