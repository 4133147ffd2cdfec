"""PPO for language models (InstructGPT's RL stage): policy, reference, value model and any reward function.

TRL removed its PPOTrainer in 1.13; this one is ours, built on torch + Accelerate.

    from pipeline.alignment import PPOConfig, PPOTrainer

    trainer = PPOTrainer(
        PPOConfig(output_dir="outputs/ppo", batch_size=16, mini_batch_size=4, max_steps=100, save_steps=25),
        policy=policy,              # causal LM, or a PEFT model (then the reference is the policy with adapters off)
        tokenizer=tokenizer,        # needs eos_token_id and pad_token_id
        value_model=value_model,    # AutoModelForSequenceClassification-like, num_labels=1 (often the reward model)
        reward_fn=reward_fn,        # (prompts_ids: list[list[int]], responses_ids: list[list[int]]) -> Tensor (B,)
        prompts=prompt_ids,         # token-id lists: tokenizer.apply_chat_template(m, add_generation_prompt=True)
        ref_model=None,             # a frozen copy of the starting policy; may be None for a PEFT policy
    )
    history = trainer.train(resume_from_checkpoint=None)   # or a checkpoint path, or True for the latest one
    trainer.save_model("outputs/ppo")                      # policy (adapter for PEFT) + tokenizer

One step: take `batch_size` prompts (per process), left-pad, sample `response_length` tokens, pad after the first
EOS, score with `reward_fn` (responses end with their EOS when they have one; the caller maps token ids to another
tokenizer if its reward model needs one), compute log-probs of the policy and reference and the value of each
response token, turn score and per-token KL into per-token rewards, run GAE, then `ppo_epochs` passes over the
rollout in shuffled groups of `mini_batch_size * gradient_accumulation_steps` rows with one optimiser step per
group. Models run in eval mode (dropout off) so the first-epoch ratio is 1. In float32 the rollout's policy
log-probs are the logits `generate` computed while sampling (one forward pass fewer; equal to a forward pass within
1e-5); under mixed precision they come from a forward pass, since cached low-precision logits differ from it.
Sampling, policy and reference all run under the accelerator's autocast, so their KL starts at 0.

Options that change the objective (each measured on the demo task in docs/experiments.md): `kl_penalty` ("reward":
-coef x KL in every token's reward, InstructGPT; "loss": coef x the k3 KL in the policy loss), `kl_estimator`,
`adaptive_kl`, `whiten_advantages`, `lr_scheduler_type` ("constant", "linear" to 0 as TRL's former PPOTrainer,
"cosine") with `warmup_steps`, `value_warmup_steps` (the value model trains alone for the first steps) and
`score_after_eos` (on by default: the score is the reward of one more state after EOS, which the value model learns
too, as TRL's former PPOTrainer placed it; off, it is the EOS token's reward).

`trainer.history` holds one dict per step (mean_score: reward_fn's mean before the missing-EOS penalty; kl: mean
per-response sum of the per-token estimate; entropy; policy_clipfrac; value_clipfrac; approx_kl; policy_loss;
value_loss; response_length: mean real tokens; kl_coef: the coefficient this step used; learning_rate: the
policy's; step), averaged over processes; `trainer.samples` the decoded (prompt, response, score) of the last step.
`trainer.evaluate(prompts)` gives the reward and KL of the current policy on other (held-out) prompts.

Checkpoints go to `output_dir/checkpoint-<step>/` (policy/, value_model/, optimizer.pt, trainer_state.json with the
schedule, rng_state_<rank>.pth; under FSDP and DeepSpeed Accelerate's `save_state` shards in engine_state/),
written to a temporary folder and renamed, so a crash never leaves a half-written one; a resumed run reproduces the uninterrupted one exactly (pass the same reference model and prompts). A non-finite loss
raises RuntimeError naming the step before any update, leaving the last checkpoint as it was.

PPO-ptx (InstructGPT, Ouyang et al. 2022, eq. 2): with `ptx_coef > 0` and `ptx_data` (rows {"input_ids",
"labels"}, -100 = no loss), every optimiser step also lowers `ptx_coef` x the language-model loss on as many ptx
rows as rollout rows, so RL does not unlearn what supervised training taught (the "alignment tax"). Rows come in a
seeded order derived from the step, so resuming stays exact; `history` then holds `ptx_loss` too.

Distributed: under `accelerate launch`, `batch_size` is per process and ranks take disjoint prompts. Policy and
value model are one module (`PolicyAndValue`) prepared together with one AdamW holding two parameter groups (policy
and value learning rates), as FSDP and DeepSpeed require. Advantages are whitened and losses averaged over the tokens
of every process, so N processes x batch B train the weights of one process x N*B (tested on CPU with gloo). Under
FSDP2 the root's weights are gathered around generation and `generate` runs with `synced_gpus`; under DeepSpeed the
reference runs in the engine's dtype and gradients are clipped by the engine as one norm (the sharded paths have not
run on GPUs here).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm
from transformers import GenerationConfig

from pipeline.artifacts import latest_checkpoint
from pipeline.data.chat_templates import stop_token_ids
from pipeline.data.padding import padded_batch, padded_lm_batch

from .ppo_core import (
    AdaptiveKLController,
    FixedKLController,
    after_eos_mask,
    apply_missing_eos_penalty,
    clipped_policy_loss,
    clipped_value_loss,
    compute_gae,
    entropy_from_logits,
    kl_estimate,
    logprobs_of,
    masked_mean,
    masked_whiten,
    token_level_rewards,
    truncate_after_eos,
)

logger = logging.getLogger(__name__)

RewardFn = Callable[[list[list[int]], list[list[int]]], torch.Tensor]
STAT_KEYS = ("mean_score", "kl", "entropy", "policy_clipfrac", "value_clipfrac", "approx_kl", "policy_loss",
             "value_loss", "response_length", "kl_coef", "learning_rate")
SCHEDULES = {  # learning-rate multiplier at progress 0..1 through max_steps, after warmup
    "constant": lambda progress: 1.0,
    "linear": lambda progress: max(0.0, 1.0 - progress),
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))),
}


@dataclass
class PPOConfig:
    """Hyperparameters of `PPOTrainer`; names follow TRL's former PPOConfig where one existed."""

    output_dir: str = "outputs/ppo"  # checkpoints go to output_dir/checkpoint-<step>/
    learning_rate: float = 1e-5  # policy AdamW learning rate
    value_learning_rate: float | None = None  # value-model AdamW learning rate; None = learning_rate
    weight_decay: float = 0.0  # AdamW weight decay for both parameter groups
    lr_scheduler_type: str = "linear"  # "linear" (to 0 at max_steps, as TRL's PPOTrainer), "cosine" or "constant"
    warmup_steps: int = 0  # PPO steps of linear learning-rate warmup (both models)
    value_warmup_steps: int = 0  # the first PPO steps train the value model only (the policy waits for a critic)
    batch_size: int = 8  # prompts per rollout (per process)
    mini_batch_size: int = 2  # rows per forward/backward pass
    gradient_accumulation_steps: int = 1  # micro-batches per optimiser step
    ppo_epochs: int = 4  # passes over each rollout
    max_steps: int = 100  # rollouts (PPO steps) in the whole run
    response_length: int = 32  # max new tokens per response
    temperature: float = 0.7  # sampling temperature; log-probs use the same scaling
    top_k: int = 0  # 0 = sample from the whole vocabulary
    rollout_batch_size: int | None = None  # rows per generate/forward call in the rollout; None = batch_size
    rollout_logprobs: str = "auto"  # "generation" (from generate's logits, one policy forward fewer), "forward",
    # or "auto": generation in float32, a forward pass under mixed precision (cached low-precision logits differ)
    kl_estimator: str = "k1"  # per-token KL in the reward: "k1" (log ratio) or "k3" (non-negative)
    kl_penalty: str = "reward"  # "reward": -kl_coef x KL in each token's reward (InstructGPT); "loss": kl_coef x the
    # k3 KL of the current policy added to the policy loss (GRPO's form), the reward is then the score alone
    init_kl_coef: float = 0.05  # KL penalty coefficient (initial value when adaptive)
    adaptive_kl: bool = False  # adapt the coefficient towards kl_target (Ziegler et al. 2019)
    kl_target: float = 6.0  # target KL per response for the adaptive controller
    kl_horizon: int = 10000  # adaptive controller horizon, in samples
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    cliprange: float = 0.2  # policy ratio clip
    cliprange_value: float = 0.2  # value clip around the rollout values
    vf_coef: float = 0.1  # weight of the value loss
    whiten_advantages: bool = True  # normalise advantages over the rollout
    score_after_eos: bool = True  # the score as the reward of one more state after EOS, whose value the critic
    # learns too (as TRL's former PPOTrainer); False: the score is the EOS token's reward
    missing_eos_penalty: float | None = None  # subtracted from the score of responses without EOS
    max_grad_norm: float | None = None  # gradient clipping per model; None or 0 = off, as TRL's former PPOTrainer
    # (clipping raised the KL for the same reward: docs/experiments.md)
    seed: int = 42  # sampling, prompt order and mini-batch shuffling
    save_steps: int = 0  # checkpoint every N steps; 0 = never
    logging_steps: int = 1  # log every N steps (history records every step)
    ptx_coef: float = 0.0  # PPO-ptx: weight of the language-model loss on `ptx_data` in every policy update
    num_logged_samples: int = 8  # rows kept in `trainer.samples`

    def __post_init__(self):
        for name in ("batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs", "response_length",
                     "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"PPOConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps < 0 or self.save_steps < 0:
            raise ValueError(f"PPOConfig.max_steps ({self.max_steps}) and save_steps ({self.save_steps}) must be >= 0")
        group = self.mini_batch_size * self.gradient_accumulation_steps
        if self.batch_size % group:
            raise ValueError(
                f"PPOConfig.batch_size={self.batch_size} must be a multiple of mini_batch_size * "
                f"gradient_accumulation_steps = {self.mini_batch_size} * {self.gradient_accumulation_steps} = {group}"
            )
        if self.kl_penalty not in ("reward", "loss"):
            raise ValueError(f"PPOConfig.kl_penalty must be 'reward' or 'loss', got {self.kl_penalty!r}")
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"PPOConfig.kl_estimator must be 'k1' or 'k3', got {self.kl_estimator!r}")
        if self.temperature <= 0:
            raise ValueError(f"PPOConfig.temperature must be > 0 (sampling), got {self.temperature}")
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            raise ValueError(f"PPOConfig.missing_eos_penalty={self.missing_eos_penalty} is subtracted from the score: "
                             "pass a positive number or None")
        if self.ptx_coef < 0:
            raise ValueError(f"PPOConfig.ptx_coef must be >= 0 (0 = no ptx loss), got {self.ptx_coef}")
        if self.lr_scheduler_type not in SCHEDULES:
            raise ValueError(f"PPOConfig.lr_scheduler_type must be one of {sorted(SCHEDULES)}, got "
                             f"{self.lr_scheduler_type!r}")
        if self.warmup_steps < 0 or self.value_warmup_steps < 0:
            raise ValueError(f"PPOConfig.warmup_steps ({self.warmup_steps}) and value_warmup_steps "
                             f"({self.value_warmup_steps}) must be >= 0")
        if self.rollout_logprobs not in ("auto", "generation", "forward"):
            raise ValueError(f"PPOConfig.rollout_logprobs must be 'auto', 'generation' or 'forward', got "
                             f"{self.rollout_logprobs!r}")
        if self.rollout_batch_size is not None and self.rollout_batch_size < 1:
            raise ValueError(f"PPOConfig.rollout_batch_size must be >= 1 or None, got {self.rollout_batch_size}")


def value_backbone_and_head(value_model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The decoder and the `score` head of a sequence-classification model, to read a value at every token."""
    prefix = getattr(value_model, "base_model_prefix", "model")
    backbone = getattr(value_model, prefix, None)
    if backbone is None:
        backbone = getattr(value_model, "model", None)
    head = getattr(value_model, "score", None)
    if backbone is None or head is None:
        raise ValueError(
            f"value_model ({type(value_model).__name__}) needs a backbone attribute `{prefix}` and a `score` head, as "
            "AutoModelForSequenceClassification decoder models have; load it with num_labels=1"
        )
    return backbone, head


def token_values(value_model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The value head applied at every position: (B, T) in float32 (the model's forward pools to one token)."""
    backbone, head = value_backbone_and_head(value_model)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=False).last_hidden_state  # (B, T, C)
    return head(hidden).squeeze(-1).float()


def seeded_slice(n: int, start: int, size: int, seed: int, orders: dict[int, torch.Tensor]) -> list[int]:
    """Indices `start .. start+size` of an endless stream over range(n): one seeded permutation per pass."""
    indices = []
    for position in range(start, start + size):
        epoch = position // n
        if epoch not in orders:
            orders[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        indices.append(int(orders[epoch][position % n]))
    return indices


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding, as `generate` computes them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class PolicyAndValue(nn.Module):
    """Policy and value model as one module, so one DDP wrapper syncs both and a forward returns both."""

    def __init__(self, policy: nn.Module, value_model: nn.Module):
        super().__init__()
        self.policy = policy
        self.value_model = value_model

    def forward(self, input_ids, attention_mask, response_length: int, temperature: float, ptx: tuple | None = None):
        """Logits that predicted each response token (B, R, V), scaled by 1/temperature, their values (B, R), and
        the summed next-token loss of the policy on `ptx` = (ids, attention_mask, labels) (None without it)."""
        position_ids = positions_from_mask(attention_mask)
        logits = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False, logits_to_keep=response_length + 1).logits
        logits = logits[:, :-1].float() / temperature
        values = token_values(self.value_model, input_ids, attention_mask, position_ids)
        ptx_loss = None
        if ptx is not None:  # in this forward, so one DDP pass syncs the gradients of both losses
            ids, mask, labels = ptx
            ptx_logits = self.policy(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            ptx_loss = nn.functional.cross_entropy(ptx_logits.reshape(-1, ptx_logits.shape[-1]),
                                                   labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
        return logits, values[:, -response_length - 1:-1], ptx_loss


class PPOTrainer:
    """PPO with a clipped policy and value objective, KL penalty to a reference, GAE; see the module docstring."""

    def __init__(self, config: PPOConfig, policy: nn.Module, tokenizer, value_model: nn.Module, reward_fn: RewardFn,
                 prompts: Sequence[Sequence[int]], ref_model: nn.Module | None = None,
                 accelerator: Accelerator | None = None, ptx_data: Sequence[dict] | None = None):
        self.config = config
        self.tokenizer = tokenizer
        self.reward_fn = reward_fn
        self.prompts = self._check_prompts(prompts)
        self.eos_id, self.pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.stop_ids = stop_token_ids(tokenizer)  # the chat template's end of turn, then eos
        if self.eos_id is None or self.pad_id is None:
            raise ValueError("PPOTrainer: the tokenizer needs eos_token_id and pad_token_id "
                             f"(got eos={self.eos_id}, pad={self.pad_id}); set tokenizer.pad_token")
        self.ptx_data = self._check_ptx(ptx_data) if config.ptx_coef > 0 else None
        if ptx_data and config.ptx_coef == 0:
            logger.warning("PPOTrainer: ptx_data given but ptx_coef is 0, so it is not used")
        self.stat_keys = STAT_KEYS + (("ptx_loss",) if self.ptx_data else ())
        if ref_model is None and not hasattr(policy, "disable_adapter"):
            raise ValueError("PPOTrainer: pass ref_model (a frozen copy of the starting policy), or a PEFT policy "
                             "whose reference is itself with the adapter disabled")
        value_backbone_and_head(value_model)  # fail early on a model without per-token values

        if accelerator is None:
            # Without a GPU, Accelerate joins the launcher's process group only when asked for CPU explicitly.
            distributed_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
            accelerator = Accelerator(cpu=distributed_cpu)
        self.accelerator = accelerator
        self.engine = accelerator.distributed_type
        device = self.accelerator.device
        self.policy, self.value_model = policy.to(device), value_model.to(device)
        self.ref_model = ref_model
        if ref_model is not None:
            ref_model.to(device).eval().requires_grad_(False)
            if self.engine == DistributedType.DEEPSPEED and accelerator.mixed_precision in ("bf16", "fp16"):
                # DeepSpeed casts the policy's weights instead of autocasting: the reference runs in that dtype too
                ref_model.to(torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float16)

        policy_params = [p for p in self.policy.parameters() if p.requires_grad]
        value_params = [p for p in self.value_model.parameters() if p.requires_grad]
        if not policy_params or not value_params:
            raise ValueError("PPOTrainer: the policy and the value model each need trainable parameters")
        value_lr = config.learning_rate if config.value_learning_rate is None else config.value_learning_rate
        # One optimiser, two parameter groups: FSDP and DeepSpeed prepare a model together with its optimiser.
        # The fused kernel: one pass over all parameters (4x faster than the per-tensor loop on CPU); the sharded
        # engines keep torch's default, which handles their parameter types.
        fused = True if self.engine in (DistributedType.NO, DistributedType.MULTI_CPU,
                                        DistributedType.MULTI_GPU) else None
        self.optimizer = torch.optim.AdamW([{"params": policy_params, "lr": config.learning_rate},
                                            {"params": value_params, "lr": value_lr}],
                                           weight_decay=config.weight_decay, fused=fused)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, [
            lambda step: self._lr_factor(step, policy=True), lambda step: self._lr_factor(step, policy=False)])
        if self.engine == DistributedType.DEEPSPEED:  # no dataloader is prepared, so DeepSpeed cannot infer it
            plugin = accelerator.state.deepspeed_plugin
            plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.mini_batch_size
            plugin.deepspeed_config["gradient_accumulation_steps"] = config.gradient_accumulation_steps
            plugin.deepspeed_config["gradient_clipping"] = config.max_grad_norm or 0.0  # one norm over both models
        self.actor_critic, self.optimizer = self.accelerator.prepare(PolicyAndValue(self.policy, self.value_model),
                                                                     self.optimizer)
        self._policy_params, self._value_params = policy_params, value_params
        if self.engine == DistributedType.FSDP:
            # FSDP2 makes the first module whose forward runs the root: run the prepared module once, so a later
            # `generate` on the inner policy cannot claim that role.
            with torch.no_grad():
                ids = torch.full((1, 2), self.eos_id, dtype=torch.long, device=device)
                self.actor_critic(ids, torch.ones_like(ids), 1, 1.0)
        # Every process must take part in each generation step when weights are sharded.
        self._synced_gpus = accelerator.num_processes > 1 and self.engine in (DistributedType.FSDP,
                                                                              DistributedType.DEEPSPEED)
        self._logprobs_from_generation = config.rollout_logprobs == "generation" or (
            config.rollout_logprobs == "auto" and accelerator.mixed_precision == "no")

        if config.adaptive_kl:
            self.kl_controller = AdaptiveKLController(config.init_kl_coef, config.kl_target, config.kl_horizon)
        else:
            self.kl_controller = FixedKLController(config.init_kl_coef)
        self.generation_config = GenerationConfig(
            do_sample=True, temperature=config.temperature, top_k=config.top_k, top_p=1.0, repetition_penalty=1.0,
            max_new_tokens=config.response_length, eos_token_id=self.stop_ids, pad_token_id=self.pad_id,
            return_dict_in_generate=True, output_logits=self._logprobs_from_generation,
        )
        self.step = 0
        self.history: list[dict] = []
        self.samples: list[dict] = []
        self._prompt_orders: dict[int, torch.Tensor] = {}
        self._ptx_orders: dict[int, torch.Tensor] = {}

    @staticmethod
    def _check_prompts(prompts) -> list[list[int]]:
        if not prompts:
            raise ValueError("PPOTrainer: prompts is empty; pass a list of token-id lists")
        checked = []
        for i, prompt in enumerate(prompts):
            ids = list(prompt)
            if not ids or not all(isinstance(t, int) for t in ids):
                raise ValueError(f"PPOTrainer: prompts[{i}] must be a non-empty list of ints (token ids), got "
                                 f"{str(prompt)[:80]}; tokenize with apply_chat_template(..., tokenize=True)")
            checked.append(ids)
        return checked

    @staticmethod
    def _check_ptx(rows) -> list[dict]:
        if not rows:
            raise ValueError("PPOTrainer: ptx_coef > 0 needs ptx_data, a list of {'input_ids', 'labels'} rows")
        checked = []
        for i, row in enumerate(rows):
            ids = list(row.get("input_ids", [])) if isinstance(row, dict) else []
            labels = list(row.get("labels", ids)) if isinstance(row, dict) else []
            if len(ids) < 2 or len(labels) != len(ids) or all(t == -100 for t in labels[1:]):
                raise ValueError(f"PPOTrainer: ptx_data[{i}] needs input_ids (2+ tokens) and labels of the same "
                                 f"length with at least one trained token after the first (-100 = no loss), got "
                                 f"{str(row)[:80]}")
            checked.append({"input_ids": ids, "labels": labels})
        return checked

    # ---------------------------------------------------------------- rollout

    def _prompt_batch(self, step: int) -> list[list[int]]:
        """The prompts of one step: a fresh seeded permutation per pass over the dataset, ranks take disjoint slices."""
        size = self.config.batch_size
        start = (step * self.accelerator.num_processes + self.accelerator.process_index) * size
        return [self.prompts[i] for i in seeded_slice(len(self.prompts), start, size, self.config.seed,
                                                      self._prompt_orders)]

    def _ptx_batch(self, step: int, group_index: int, size: int) -> tuple[torch.Tensor, ...]:
        """The ptx rows of one optimiser step (as many as its rollout rows), padded; ranks take disjoint slices."""
        per_step = self.config.ppo_epochs * self.config.batch_size
        start = (step * self.accelerator.num_processes + self.accelerator.process_index) * per_step + group_index * size
        picked = seeded_slice(len(self.ptx_data), start, size, self.config.seed + 1_000_003, self._ptx_orders)
        ids, mask, labels = padded_lm_batch([self.ptx_data[i] for i in picked], self.pad_id)
        device = self.accelerator.device
        return ids.to(device), mask.to(device), labels.to(device)

    def _reference_logprobs(self, input_ids, attention_mask, response_ids) -> torch.Tensor:
        length = response_ids.shape[1]
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=length + 1,
                      position_ids=positions_from_mask(attention_mask))
        with self.accelerator.autocast():  # the precision the policy's log-probs were computed in
            if self.ref_model is not None:
                logits = self.ref_model(**kwargs).logits
            else:
                with self._full_weights(), self.policy.disable_adapter():
                    logits = self.policy(**kwargs).logits
        return logprobs_of(logits[:, :-1].float() / self.config.temperature, response_ids)

    @torch.no_grad()
    def _rollout(self, step: int) -> dict:
        cfg, device = self.config, self.accelerator.device
        self.policy.eval(), self.value_model.eval()
        prompts = self._prompt_batch(step)
        chunk = cfg.rollout_batch_size or cfg.batch_size
        parts = []
        for begin in range(0, len(prompts), chunk):
            parts.append(self._rollout_chunk(prompts[begin:begin + chunk]))
        width = max(p["query"].shape[1] for p in parts)
        for p in parts:  # chunks may differ in prompt width: left-pad them to one
            extra = width - p["query"].shape[1]
            p["query"] = nn.functional.pad(p["query"], (extra, 0), value=self.pad_id)
            p["query_mask"] = nn.functional.pad(p["query_mask"], (extra, 0), value=0)
        batch = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
        mask, value_mask = batch["response_mask"], batch["value_mask"]
        responses, scores = self._score(prompts, batch["response"], mask, f"PPO step {step + 1}")
        penalised = apply_missing_eos_penalty(scores, batch["has_eos"], cfg.missing_eos_penalty)
        kl = kl_estimate(batch["logprobs"], batch["ref_logprobs"], cfg.kl_estimator) * mask
        kl_coef = self.kl_controller.value
        rewards = token_level_rewards(penalised, kl, value_mask, kl_coef if cfg.kl_penalty == "reward" else 0.0)
        advantages, returns = compute_gae(rewards, batch["values"], value_mask, cfg.gamma, cfg.lam)
        advantages = advantages * mask  # the state after EOS (score_after_eos) takes no action
        if cfg.whiten_advantages:  # over the rollout of every process, as one process would
            reduce_sum = (lambda t: self.accelerator.reduce(t, reduction="sum")) if (
                self.accelerator.num_processes > 1) else None
            advantages = masked_whiten(advantages, mask, reduce_sum=reduce_sum)
        batch.update(advantages=advantages, returns=returns)

        self.samples = [
            {"prompt": self.tokenizer.decode(p, skip_special_tokens=False),
             "response": self.tokenizer.decode(r, skip_special_tokens=False), "score": float(s)}
            for p, r, s in zip(prompts[:cfg.num_logged_samples], responses, scores.tolist())
        ]
        stats = {
            "mean_score": scores.mean(),
            "kl": kl.sum(1).mean(),
            "entropy": masked_mean(batch.pop("entropy"), mask),
            "response_length": mask.sum(1).float().mean(),
            "kl_coef": torch.tensor(kl_coef, device=device),
        }
        return {"batch": batch, "stats": stats}

    def _score(self, prompts: list[list[int]], response: torch.Tensor, mask: torch.Tensor,
               where: str) -> tuple[list[list[int]], torch.Tensor]:
        """The responses as token lists (padding dropped) and `reward_fn`'s scores, one finite float32 each."""
        responses = [row[m.bool()].tolist() for row, m in zip(response.cpu(), mask.cpu())]
        scores = torch.as_tensor(self.reward_fn(prompts, responses), dtype=torch.float32).reshape(-1)
        if scores.shape[0] != len(prompts) or not torch.isfinite(scores).all():
            raise RuntimeError(f"{where}: reward_fn must return one finite score per response ({len(prompts)}), "
                               f"got {scores.tolist()}")
        return responses, scores.to(self.accelerator.device)

    def _rollout_chunk(self, prompts: list[list[int]]) -> dict:
        cfg, device, length = self.config, self.accelerator.device, self.config.response_length
        query, query_mask = (t.to(device) for t in padded_batch(prompts, self.pad_id, side="left"))
        with self._full_weights(), self.accelerator.autocast():  # sample from the policy the update computes
            generated = self.policy.generate(input_ids=query, attention_mask=query_mask,
                                             generation_config=self.generation_config,
                                             synced_gpus=self._synced_gpus)
        response = generated.sequences[:, query.shape[1]:]
        steps = response.shape[1]
        if steps < length:  # every row stopped early
            response = nn.functional.pad(response, (0, length - steps), value=self.pad_id)
        response, response_mask, has_eos = truncate_after_eos(response, self.stop_ids, self.pad_id)
        input_ids = torch.cat([query, response], dim=1)
        attention_mask = torch.cat([query_mask, response_mask], dim=1)
        if self._logprobs_from_generation:
            # The logits `generate` computed before sampling each token: the same numbers a forward pass over the
            # finished rows gives (float32, within rounding), without that forward.
            logits = torch.stack(generated.logits, dim=1).float() / cfg.temperature
            logits = nn.functional.pad(logits, (0, 0, 0, length - steps))
            with self._full_weights(), self.accelerator.autocast():
                values = token_values(self.value_model, input_ids, attention_mask,
                                      positions_from_mask(attention_mask))[:, -length - 1:-1]
        else:
            logits, values, _ = self.actor_critic(input_ids, attention_mask, length, cfg.temperature)
        padding = response_mask == 0
        value_mask = after_eos_mask(response_mask) if cfg.score_after_eos else response_mask
        return {
            "query": query, "query_mask": query_mask, "response": response, "response_mask": response_mask,
            "value_mask": value_mask, "has_eos": has_eos,
            "logprobs": logprobs_of(logits, response).masked_fill(padding, 0.0),
            "ref_logprobs": self._reference_logprobs(input_ids, attention_mask, response).masked_fill(padding, 0.0),
            "values": values.masked_fill(value_mask == 0, 0.0),
            "entropy": entropy_from_logits(logits),
        }

    @contextmanager
    def _full_weights(self):
        """Calls on the policy or value model outside the prepared module's forward: under FSDP2 the weights that
        belong to the root (embeddings, head, final norm) are gathered first; inner layers gather themselves."""
        unshard = getattr(self.actor_critic, "unshard", None) if self.engine == DistributedType.FSDP else None
        if unshard is None:
            yield
            return
        unshard()
        try:
            yield
        finally:
            self.actor_critic.reshard()

    @torch.no_grad()
    def evaluate(self, prompts: Sequence[Sequence[int]], batch_size: int | None = None) -> dict:
        """Reward and KL of the current policy on other prompts (held out, say): one response per prompt, sampled
        as in training and scored by `reward_fn` (without the missing-EOS penalty); `kl` is the mean per-response
        sum of log p - log p_ref (k1). Training's random state is left as it was."""
        self.policy.eval(), self.value_model.eval()
        prompts = self._check_prompts(prompts)
        chunk = batch_size or self.config.rollout_batch_size or self.config.batch_size
        scores, kls, lengths = [], [], []
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            for begin in range(0, len(prompts), chunk):
                part = prompts[begin:begin + chunk]
                rollout = self._rollout_chunk(part)
                mask = rollout["response_mask"]
                scores.append(self._score(part, rollout["response"], mask, "evaluate")[1].cpu())
                kls.append(((rollout["logprobs"] - rollout["ref_logprobs"]) * mask).sum(1).cpu())
                lengths.append(mask.sum(1).float().cpu())
        return {"reward": torch.cat(scores).mean().item(), "kl": torch.cat(kls).mean().item(),
                "response_length": torch.cat(lengths).mean().item(), "samples": len(prompts)}

    # ---------------------------------------------------------------- optimisation

    def _optimize(self, batch: dict, step: int) -> dict:
        cfg = self.config
        micro, accumulation = cfg.mini_batch_size, cfg.gradient_accumulation_steps
        group = micro * accumulation
        totals = {key: 0.0 for key in ("policy_loss", "value_loss", "policy_clipfrac", "value_clipfrac", "approx_kl",
                                       "ptx_loss")}
        n_groups = n_micro = 0
        for order in self.minibatch_orders(step):
            order = order.to(self.accelerator.device)
            for start in range(0, cfg.batch_size, group):
                rows = order[start:start + group]
                num_tokens = (self._global_token_count(batch["response_mask"][rows].sum()),
                              self._global_token_count(batch["value_mask"][rows].sum()))
                ptx = self._ptx_batch(step, n_groups, group) if self.ptx_data else None
                ptx_tokens = None if ptx is None else self._global_token_count((ptx[2][:, 1:] != -100).sum())
                for k in range(accumulation):
                    sync = k == accumulation - 1
                    part = slice(k * micro, (k + 1) * micro)
                    ptx_part = None if ptx is None else (ptx[0][part], ptx[1][part], ptx[2][part], ptx_tokens)
                    with nullcontext() if sync else self.accelerator.no_sync(self.actor_critic):
                        stats = self._micro_step(batch, rows[part], num_tokens, step, ptx_part)
                    for key in ("policy_loss", "value_loss", "ptx_loss"):
                        totals[key] += stats[key]
                    for key in ("policy_clipfrac", "value_clipfrac", "approx_kl"):
                        totals[key] += stats[key] / accumulation
                    n_micro += 1
                self._clip_gradients()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                n_groups += 1
        # Losses were summed as shares of their group's mean; the rest as per-group means.
        stats = {key: value / n_groups for key, value in totals.items()}
        if not self.ptx_data:
            stats.pop("ptx_loss")
        return stats

    def minibatch_orders(self, step: int) -> list[torch.Tensor]:
        """The row order of each PPO epoch of step `step` (0-based), seeded by the step so a resumed run shuffles as
        the uninterrupted one did; consecutive groups of `mini_batch_size * gradient_accumulation_steps` rows make
        one optimiser step each."""
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)
        return [torch.randperm(self.config.batch_size, generator=generator) for _ in range(self.config.ppo_epochs)]

    def _global_token_count(self, local: torch.Tensor) -> torch.Tensor:
        """The denominator of a token mean over the rows of every process. DDP averages gradients over N processes,
        so each divides its token sum by (all tokens / N): the result is the one-process mean over all rows."""
        local = local.float()
        if self.accelerator.num_processes > 1:
            local = self.accelerator.reduce(local, reduction="sum") / self.accelerator.num_processes
        return local.clamp(min=1)

    def _clip_gradients(self) -> None:
        """Clip policy and value gradients to `max_grad_norm` each (DeepSpeed clips in its engine, from its config)."""
        if not self.config.max_grad_norm or self.engine == DistributedType.DEEPSPEED:
            return
        self.accelerator.unscale_gradients()  # fp16: clip the true gradients (a no-op otherwise)
        for params in (self._policy_params, self._value_params):
            torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)

    def _lr_factor(self, step: int, policy: bool) -> float:
        """Learning-rate multiplier of PPO step `step` (0-based) for the policy or the value group."""
        cfg = self.config
        if policy and step < cfg.value_warmup_steps:
            return 0.0
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return SCHEDULES[cfg.lr_scheduler_type](progress)

    def _micro_step(self, batch: dict, rows: torch.Tensor, num_tokens: tuple[torch.Tensor, torch.Tensor], step: int,
                    ptx: tuple | None = None) -> dict:
        """Forward and backward of one micro-batch. Its losses are its share of the group's token mean, so
        accumulated micro-batches give the gradient of one large batch. `num_tokens`: the group's policy and value
        token counts; `ptx`: (ids, mask, labels, group tokens)."""
        cfg = self.config
        query_mask, mask, value_mask = (batch[k][rows] for k in ("query_mask", "response_mask", "value_mask"))
        # The least padding: drop the prompt columns no row of this micro-batch uses and the response columns after
        # its longest response (masked positions add nothing to the losses, so the result is the same).
        first, width = int(query_mask.any(0).long().argmax()), int(value_mask.sum(1).max())
        query, query_mask = batch["query"][rows, first:], query_mask[:, first:]
        response, mask, value_mask = batch["response"][rows, :width], mask[:, :width], value_mask[:, :width]
        policy_tokens, value_tokens = num_tokens
        input_ids = torch.cat([query, response], dim=1)
        attention_mask = torch.cat([query_mask, mask], dim=1)
        logits, values, ptx_sum = self.actor_critic(input_ids, attention_mask, width, cfg.temperature,
                                                    None if ptx is None else ptx[:3])
        padding = mask == 0
        new_logprobs = logprobs_of(logits, response).masked_fill(padding, 0.0)
        values = values.masked_fill(value_mask == 0, 0.0)
        old = {key: batch[key][rows, :width] for key in ("logprobs", "ref_logprobs", "advantages", "values",
                                                          "returns")}
        policy_loss, policy_clipfrac, approx_kl = clipped_policy_loss(
            new_logprobs, old["logprobs"], old["advantages"], mask, cfg.cliprange, policy_tokens)
        if cfg.kl_penalty == "loss":  # the KL of the policy being trained, differentiable, never negative (k3)
            kl = kl_estimate(new_logprobs, old["ref_logprobs"], "k3")
            policy_loss = policy_loss + self.kl_controller.value * masked_mean(kl, mask, policy_tokens)
        value_loss, value_clipfrac = clipped_value_loss(
            values, old["values"], old["returns"], value_mask, cfg.cliprange_value, value_tokens)
        ptx_loss = torch.zeros((), device=policy_loss.device) if ptx_sum is None else ptx_sum / ptx[3]
        if not (torch.isfinite(policy_loss) and torch.isfinite(value_loss) and torch.isfinite(ptx_loss)):
            raise RuntimeError(
                f"PPO step {step + 1}: non-finite loss (policy_loss={policy_loss.item()}, value_loss="
                f"{value_loss.item()}, ptx_loss={ptx_loss.item()}); training stopped before the update, so the last "
                f"checkpoint in {self.config.output_dir} is intact. Lower learning_rate/value_learning_rate or check "
                "reward_fn."
            )
        loss = policy_loss + cfg.vf_coef * value_loss + cfg.ptx_coef * ptx_loss
        if self.engine == DistributedType.DEEPSPEED:  # its engine divides by its accumulation steps; ours is a share
            loss = loss * cfg.gradient_accumulation_steps
        self.accelerator.backward(loss)
        return {"policy_loss": policy_loss.item(), "value_loss": value_loss.item(), "ptx_loss": ptx_loss.item(),
                "policy_clipfrac": policy_clipfrac.item(), "value_clipfrac": value_clipfrac.item(),
                "approx_kl": approx_kl.item()}

    # ---------------------------------------------------------------- loop

    def train(self, resume_from_checkpoint: str | Path | bool | None = None) -> list[dict]:
        """Run PPO up to `config.max_steps`; returns `self.history`. `resume_from_checkpoint`: a checkpoint folder,
        or True for the latest `checkpoint-<step>` in output_dir."""
        cfg = self.config
        if resume_from_checkpoint:
            path = self.latest_checkpoint() if resume_from_checkpoint is True else Path(resume_from_checkpoint)
            self.load_checkpoint(path)
        else:
            rank_seed = cfg.seed + self.accelerator.process_index
            random.seed(rank_seed)
            torch.manual_seed(rank_seed)
        progress = tqdm(total=cfg.max_steps, initial=self.step, desc="ppo",
                        disable=not self.accelerator.is_main_process)
        while self.step < cfg.max_steps:
            rollout = self._rollout(self.step)
            train_stats = self._optimize(rollout["batch"], self.step)
            stats = {key: float(value) for key, value in rollout["stats"].items()}
            stats.update(train_stats, learning_rate=self.optimizer.param_groups[0]["lr"])
            stats = self._reduce(stats)
            self.kl_controller.update(stats["kl"], cfg.batch_size * self.accelerator.num_processes)
            self.scheduler.step()
            self.step += 1
            self.history.append({**stats, "step": self.step})
            progress.update(1)
            if self.step % cfg.logging_steps == 0:
                progress.set_postfix(score=f"{stats['mean_score']:.3f}", kl=f"{stats['kl']:.3f}")
                logger.info("step %d: %s", self.step, ", ".join(f"{k}={stats[k]:.4g}" for k in self.stat_keys))
            if cfg.save_steps and self.step % cfg.save_steps == 0:
                self.save_checkpoint()
        progress.close()
        return self.history

    def _reduce(self, stats: dict) -> dict:
        """Mean of each statistic over processes (identity on one process)."""
        if self.accelerator.num_processes == 1:
            return {key: stats[key] for key in self.stat_keys}
        values = torch.tensor([stats[key] for key in self.stat_keys], device=self.accelerator.device)
        values = self.accelerator.reduce(values, reduction="mean")
        return dict(zip(self.stat_keys, values.tolist()))

    # ---------------------------------------------------------------- saving

    @property
    def sharded(self) -> bool:
        """Whether the engine holds the weights and optimiser state in shards (FSDP, DeepSpeed)."""
        return self.engine in (DistributedType.FSDP, DistributedType.DEEPSPEED)

    def save_model(self, output_dir: str | Path) -> Path:
        """Save the policy as it is (a PEFT policy saves its adapter) and the tokenizer; sharded weights are
        gathered into one full copy first."""
        output_dir = Path(output_dir)
        self.accelerator.wait_for_everyone()
        state = None
        if self.sharded:  # a collective: every process takes part
            prefix = "policy."
            full = self.accelerator.get_state_dict(self.actor_critic)
            state = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
        if self.accelerator.is_main_process:
            self.policy.save_pretrained(output_dir, state_dict=state)  # None: the model's own weights
            self.tokenizer.save_pretrained(output_dir)
        self.accelerator.wait_for_everyone()
        return output_dir

    def save_checkpoint(self) -> Path:
        """Write `output_dir/checkpoint-<step>/` through a temporary folder renamed at the end. Under FSDP and
        DeepSpeed the weights and optimiser go through Accelerate's `save_state` (every process writes its shards)."""
        root = Path(self.config.output_dir)
        final, temporary = root / f"checkpoint-{self.step}", root / f".checkpoint-{self.step}.tmp"
        main = self.accelerator.is_main_process
        if main:
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        if self.sharded:
            self.accelerator.save_state(str(temporary / "engine_state"))
        elif main:
            self.policy.save_pretrained(temporary / "policy")
            self.value_model.save_pretrained(temporary / "value_model")
            torch.save({"optimizer": self.optimizer.state_dict()}, temporary / "optimizer.pt")
        if main:
            self.tokenizer.save_pretrained(temporary / "policy")
            state = {"step": self.step, "kl_controller": self.kl_controller.state_dict(), "history": self.history,
                     "samples": self.samples, "scheduler": self.scheduler.state_dict(),
                     "config": asdict(self.config)}
            (temporary / "trainer_state.json").write_text(json.dumps(state, indent=2))
        rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, temporary / f"rng_state_{self.accelerator.process_index}.pth")
        self.accelerator.wait_for_everyone()
        if main:
            shutil.rmtree(final, ignore_errors=True)
            temporary.rename(final)
        self.accelerator.wait_for_everyone()
        return final

    def latest_checkpoint(self) -> Path:
        """The `checkpoint-<step>` folder with the highest step in output_dir."""
        found = latest_checkpoint(self.config.output_dir)
        if found is None:
            raise FileNotFoundError(f"resume_from_checkpoint=True: no checkpoint-<step> folder with trainer_state.json "
                                    f"in {self.config.output_dir}; pass a checkpoint path or train without resuming")
        return Path(found)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore models, optimisers, KL controller, RNG states, step and history from a checkpoint folder."""
        path = Path(path)
        if not (path / "trainer_state.json").is_file():
            raise FileNotFoundError(f"{path} is not a PPO checkpoint (no trainer_state.json); expected "
                                    f"{self.config.output_dir}/checkpoint-<step>")
        if self.sharded:
            self.accelerator.load_state(str(path / "engine_state"))
        else:
            load_weights(self.policy, path / "policy")
            load_weights(self.value_model, path / "value_model")
            optimizer = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
            if "optimizer" not in optimizer:
                raise ValueError(f"{path / 'optimizer.pt'} holds two optimisers (a checkpoint of an earlier version "
                                 "with separate policy and value optimisers); restart the run without resuming")
            self.optimizer.load_state_dict(optimizer["optimizer"])
        state = json.loads((path / "trainer_state.json").read_text())
        self.step, self.history, self.samples = state["step"], state["history"], state.get("samples", [])
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.scheduler.load_state_dict(state["scheduler"])
        rng_file = path / f"rng_state_{self.accelerator.process_index}.pth"
        if not rng_file.is_file():
            raise FileNotFoundError(f"{rng_file} is missing: resume with as many processes as the run that saved "
                                    f"{path}")
        rng = torch.load(rng_file, map_location="cpu", weights_only=True)  # tensors and tuples of ints only
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])


def load_weights(model: nn.Module, folder: Path) -> None:
    """Load weights written by `save_pretrained` into an existing model (a PEFT model reads its adapter)."""
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        adapter = folder / "adapter_model.safetensors"
        if not adapter.is_file():
            raise FileNotFoundError(f"{adapter} is missing: the checkpoint was not saved from a PEFT model")
        set_peft_model_state_dict(model, load_file(adapter))
        return
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    state = {}
    for file in files:
        state.update(load_file(file))
    result = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"weights in {folder} do not fit {type(model).__name__}: missing {missing[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")


__all__ = ["PPOConfig", "PPOTrainer", "PolicyAndValue", "load_weights", "positions_from_mask", "seeded_slice",
           "token_values", "value_backbone_and_head"]
