"""PPOTrainer on tiny random PipelineGPT models with a rule reward: exact gradient accumulation, determinism,
exact resume, LoRA with the adapter-off reference, failure on a non-finite loss, learning a trivial reward, and the
PPO-ptx language-model loss."""

import copy
import json
from contextlib import nullcontext

import pytest
import torch
from peft import LoraConfig, get_peft_model

from pipeline.alignment import PPOConfig, PPOTrainer
from pipeline.alignment.ppo_core import kl_estimate
from pipeline.data.tokenizer import train_tokenizer
from pipeline.modeling import PipelineGPTConfig, PipelineGPTForCausalLM, PipelineGPTForSequenceClassification

VOCAB = 64  # the model only emits ids below this; the tokenizer has more, which is harmless
TARGET = 7  # the token the rule rewards


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["the cat sat on the mat", "a dog ran far away", "one two three four five"] * 20
    return train_tokenizer(texts, vocab_size=300, show_progress=False)


def tiny_models(seed: int = 0, **architecture):
    torch.manual_seed(seed)
    config = PipelineGPTConfig.preset("llama", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=64, pad_token_id=0, bos_token_id=1,
                                      eos_token_id=2, **architecture)
    policy = PipelineGPTForCausalLM(copy.deepcopy(config))
    ref = PipelineGPTForCausalLM(copy.deepcopy(config))
    ref.load_state_dict(policy.state_dict())
    value_config = copy.deepcopy(config)
    value_config.num_labels = 1
    return policy, ref, PipelineGPTForSequenceClassification(value_config)


def prompts(n: int = 8) -> list[list[int]]:
    generator = torch.Generator().manual_seed(123)
    return [[1] + torch.randint(3, VOCAB, (int(2 + i % 3),), generator=generator).tolist() for i in range(n)]


def fraction_of_target(prompts_ids, responses_ids) -> torch.Tensor:
    return torch.tensor([sum(t == TARGET for t in r) / max(len(r), 1) for r in responses_ids])


def contains_target(prompts_ids, responses_ids) -> torch.Tensor:
    return torch.tensor([float(TARGET in r) for r in responses_ids])


def ptx_data(n: int = 6) -> list[dict]:
    """Rows that repeat one token run; the first two tokens carry no loss, like a prompt."""
    rows = []
    for i in range(n):
        ids = [1, 3 + i] + [TARGET + 1 + i % 3] * (3 + i % 2) + [2]
        rows.append({"input_ids": ids, "labels": [-100, -100] + ids[2:]})
    return rows


def ptx_nll(model, rows) -> float:
    from pipeline.data.padding import padded_lm_batch

    ids, mask, labels = padded_lm_batch(rows, 0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()


def make_trainer(tokenizer, tmp_path, *, reward_fn=contains_target, lora=False, scramble=False, ptx=None,
                 architecture=None, accelerator=None, **overrides):
    policy, ref, value = tiny_models(**(architecture or {}))
    if scramble:  # trainable weights unlike the run being resumed; the reference stays the caller's
        with torch.no_grad():
            for p in [*policy.parameters(), *value.parameters()]:
                p.add_(torch.randn_like(p))
    if lora:
        policy = get_peft_model(policy, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                   lora_dropout=0.0, task_type="CAUSAL_LM"))
        ref = None
    settings = dict(output_dir=str(tmp_path), batch_size=4, mini_batch_size=2, ppo_epochs=2, max_steps=2,
                    response_length=6, temperature=1.0, learning_rate=1e-3, value_learning_rate=1e-3, seed=7)
    settings.update(overrides)
    return PPOTrainer(PPOConfig(**settings), policy=policy, tokenizer=tokenizer, value_model=value,
                      reward_fn=reward_fn, prompts=prompts(), ref_model=ref, ptx_data=ptx, accelerator=accelerator)


def parameters(trainer) -> dict[str, torch.Tensor]:
    named = {f"policy.{k}": v for k, v in trainer.policy.named_parameters()}
    named.update({f"value.{k}": v for k, v in trainer.value_model.named_parameters()})
    return {k: v.detach().clone() for k, v in named.items()}


def assert_same_parameters(a: dict, b: dict, atol=1e-6):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("ptx_coef,score_after_eos", [(0.0, True), (0.5, True), (0.0, False)])
def test_gradient_accumulation_equals_one_big_mini_batch(tokenizer, tmp_path, ptx_coef, score_after_eos):
    before = parameters(make_trainer(tokenizer, tmp_path / "x"))
    ptx = ptx_data() if ptx_coef else None  # ptx rows of unequal length: the loss is a token mean over the group
    # score_after_eos: the value loss averages over more tokens than the policy loss
    accumulated = make_trainer(tokenizer, tmp_path / "a", mini_batch_size=2, gradient_accumulation_steps=2,
                               max_steps=1, ppo_epochs=1, ptx_coef=ptx_coef, ptx=ptx, score_after_eos=score_after_eos)
    single = make_trainer(tokenizer, tmp_path / "b", mini_batch_size=4, gradient_accumulation_steps=1,
                          max_steps=1, ppo_epochs=1, ptx_coef=ptx_coef, ptx=ptx, score_after_eos=score_after_eos)
    accumulated.train(), single.train()
    after_accumulated, after_single = parameters(accumulated), parameters(single)
    assert_same_parameters(after_accumulated, after_single)
    # Adam hides a uniformly scaled gradient in its first step; its first moment (0.1 * grad) does not.
    states_a, states_b = accumulated.optimizer.state_dict()["state"], single.optimizer.state_dict()["state"]
    assert len(states_a) == len(before)  # one optimiser over policy and value parameters
    for state_a, state_b in zip(states_a.values(), states_b.values()):
        torch.testing.assert_close(state_a["exp_avg"], state_b["exp_avg"], atol=1e-7, rtol=1e-4)
    moved = max((after_single[k] - before[k]).abs().max().item() for k in before)
    assert moved > 1e-4  # the step really changed the weights
    if ptx_coef:
        assert accumulated.history[0]["ptx_loss"] == pytest.approx(single.history[0]["ptx_loss"], rel=1e-5)


def test_same_seed_same_history_and_step_log(tokenizer, tmp_path):
    first = make_trainer(tokenizer, tmp_path / "a").train()
    second = make_trainer(tokenizer, tmp_path / "b").train()
    assert first == second
    assert [h["step"] for h in first] == [1, 2]
    expected = {"mean_score", "kl", "entropy", "policy_clipfrac", "value_clipfrac", "approx_kl", "policy_loss",
                "value_loss", "response_length", "kl_coef", "learning_rate", "step"}
    assert set(first[0]) == expected
    # Step 1: policy = reference, and the rollout's log-probs (taken from generation) match the reference's forward
    # pass, so the KL is zero up to float32 rounding.
    assert 1 <= first[0]["response_length"] <= 6 and abs(first[0]["kl"]) <= 1e-6


def test_resumed_run_equals_uninterrupted_run(tokenizer, tmp_path):
    # The run stops in step 3 (after checkpoint-2): the learning rate decays linearly over all 4 steps.
    interrupted = make_trainer(tokenizer, tmp_path / "run", max_steps=4, save_steps=2, adaptive_kl=True,
                               kl_target=0.01, kl_horizon=10)
    optimize = interrupted._optimize

    def crash_in_step_three(batch, step):
        if step == 2:
            raise KeyboardInterrupt
        return optimize(batch, step)

    interrupted._optimize = crash_in_step_three
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "optimizer.pt", "policy", "rng_state_0.pth", "trainer_state.json", "value_model"]
    assert not list((tmp_path / "run").glob(".*tmp"))

    # Different initial weights: everything must come from the checkpoint.
    resumed = make_trainer(tokenizer, tmp_path / "run", scramble=True, max_steps=4, save_steps=2, adaptive_kl=True,
                           kl_target=0.01, kl_horizon=10)
    resumed.train(resume_from_checkpoint=True)
    straight = make_trainer(tokenizer, tmp_path / "straight", max_steps=4, adaptive_kl=True, kl_target=0.01,
                            kl_horizon=10)
    straight.train()
    assert_same_parameters(parameters(resumed), parameters(straight))
    assert [h["policy_loss"] for h in resumed.history] == pytest.approx([h["policy_loss"] for h in straight.history])
    assert resumed.kl_controller.value == pytest.approx(straight.kl_controller.value)
    assert resumed.history[-1]["kl_coef"] != resumed.history[0]["kl_coef"]  # the adaptive controller moved
    assert [h["learning_rate"] for h in resumed.history] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])
    state = json.loads((tmp_path / "run" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["step"] == 4 and len(state["history"]) == 4


def test_resume_errors_are_clear(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no checkpoint-<step>"):
        trainer.train(resume_from_checkpoint=True)


def test_lora_policy_uses_adapter_off_reference(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path / "lora", lora=True, max_steps=3, learning_rate=1e-2)
    base_before = {k: v.clone() for k, v in trainer.policy.named_parameters() if "lora_" not in k}
    history = trainer.train()
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # LoRA B starts at zero: policy == reference
    assert abs(history[-1]["kl"]) > 1e-6  # the adapter moved away from its disabled self
    for name, value in trainer.policy.named_parameters():
        if name in base_before:
            assert torch.equal(value, base_before[name]), name
    saved = trainer.save_model(tmp_path / "lora-out")
    assert (saved / "adapter_config.json").is_file() and (saved / "tokenizer.json").is_file()
    assert not (saved / "model.safetensors").exists()


def test_max_grad_norm_clips_each_model_on_its_own(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, max_grad_norm=0.5)
    for i, p in enumerate([*trainer.policy.parameters(), *trainer.value_model.parameters()]):
        p.grad = torch.full_like(p, 3.0 if i % 2 else -1.0)
    policy_before = torch.cat([p.grad.flatten() for p in trainer.policy.parameters()])
    trainer._clip_gradients()
    for model in (trainer.policy, trainer.value_model):
        assert torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item() == pytest.approx(0.5, rel=1e-5)
    policy_after = torch.cat([p.grad.flatten() for p in trainer.policy.parameters()])
    torch.testing.assert_close(policy_after, policy_before * 0.5 / policy_before.norm())  # scaled, not cut
    unclipped = make_trainer(tokenizer, tmp_path / "off")  # the default: no clipping
    for p in unclipped.policy.parameters():
        p.grad = torch.full_like(p, 3.0)
    unclipped._clip_gradients()
    assert all((p.grad == 3.0).all() for p in unclipped.policy.parameters())


def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(tokenizer, tmp_path):
    calls = []

    def explodes_at_step_two(prompts_ids, responses_ids):
        calls.append(1)
        return torch.full((len(responses_ids),), 1e38 if len(calls) == 2 else 1.0)

    trainer = make_trainer(tokenizer, tmp_path / "nan", reward_fn=explodes_at_step_two, max_steps=3, save_steps=1)
    with pytest.raises(RuntimeError, match="PPO step 2: non-finite loss"):
        trainer.train()
    assert (tmp_path / "nan" / "checkpoint-1" / "trainer_state.json").is_file()
    assert not (tmp_path / "nan" / "checkpoint-2").exists()


def test_ptx_loss_keeps_the_policy_on_its_supervised_data_and_resumes_exactly(tokenizer, tmp_path):
    rows = ptx_data()
    settings = dict(max_steps=4, learning_rate=1e-2, value_learning_rate=1e-2, init_kl_coef=0.0)
    plain = make_trainer(tokenizer, tmp_path / "plain", **settings)
    start = ptx_nll(plain.policy, rows)
    plain.train()
    with_ptx = make_trainer(tokenizer, tmp_path / "ptx", ptx_coef=1.0, ptx=rows, save_steps=2, **settings)
    history = with_ptx.train()
    assert "ptx_loss" not in plain.history[0]
    assert 0.8 * start < history[0]["ptx_loss"] < start  # step 1's mean over its updates, which already lower it
    assert ptx_nll(with_ptx.policy, rows) < 0.5 * start  # PPO alone does not teach these rows ...
    assert ptx_nll(plain.policy, rows) > 0.8 * start  # ... the ptx term does
    # The ptx rows of a step follow from the seed and the step, so a resumed run matches the uninterrupted one.
    resumed = make_trainer(tokenizer, tmp_path / "ptx", scramble=True, ptx_coef=1.0, ptx=rows, **settings)
    resumed.train(resume_from_checkpoint=tmp_path / "ptx" / "checkpoint-2")
    assert_same_parameters(parameters(resumed), parameters(with_ptx))
    assert [h["ptx_loss"] for h in resumed.history] == pytest.approx([h["ptx_loss"] for h in history])


def test_config_and_input_errors(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="batch_size=6 must be a multiple"):
        PPOConfig(batch_size=6, mini_batch_size=2, gradient_accumulation_steps=2)
    policy, _, value = tiny_models()
    with pytest.raises(ValueError, match="pass ref_model"):
        PPOTrainer(PPOConfig(), policy, tokenizer, value, contains_target, prompts())
    with pytest.raises(ValueError, match=r"prompts\[0\]"):
        PPOTrainer(PPOConfig(), policy, tokenizer, value, contains_target, ["a text prompt"], ref_model=policy)
    with pytest.raises(ValueError, match="ptx_coef must be >= 0"):
        PPOConfig(ptx_coef=-1.0)
    with pytest.raises(ValueError, match="ptx_coef > 0 needs ptx_data"):
        PPOTrainer(PPOConfig(ptx_coef=1.0), policy, tokenizer, value, contains_target, prompts(), ref_model=policy)
    with pytest.raises(ValueError, match=r"ptx_data\[1\] needs input_ids"):
        PPOTrainer(PPOConfig(ptx_coef=1.0), policy, tokenizer, value, contains_target, prompts(), ref_model=policy,
                   ptx_data=[{"input_ids": [1, 5, 2]}, {"input_ids": [1, 5, 2], "labels": [-100, -100, -100]}])


def test_policy_learns_a_trivial_reward(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path / "learn", reward_fn=fraction_of_target, batch_size=8,
                           mini_batch_size=4, ppo_epochs=4, max_steps=15, response_length=8, learning_rate=1e-2,
                           value_learning_rate=1e-2, init_kl_coef=0.0)
    history = trainer.train()
    scores = [h["mean_score"] for h in history]
    assert sum(scores[-3:]) / 3 > sum(scores[:3]) / 3 + 0.2, scores
    assert len(trainer.samples) == 8 and set(trainer.samples[0]) == {"prompt", "response", "score"}


def test_stage_reward_weights_scale_the_model_score_and_add_the_verifier(tokenizer):
    """The PPO stage's reward: reward_model_weight x RM score + verifier_weight x (answer right)."""
    from pipeline.stages.ppo import reward_function

    torch.manual_seed(0)
    config = PipelineGPTConfig.preset("llama", vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=64, num_labels=1,
                                      pad_token_id=tokenizer.pad_token_id)
    reward_model = PipelineGPTForSequenceClassification(config)
    prompt = tokenizer("one two", add_special_tokens=False).input_ids
    right, wrong = (tokenizer(" " + word, add_special_tokens=False).input_ids for word in ("three", "four"))
    references = {tuple(prompt): "three"}

    def scores(rm_weight, verifier_weight):
        score = reward_function(reward_model, tokenizer, tokenizer, references, verifier_weight, rm_weight)
        return score([prompt, prompt], [right, wrong])

    plain = scores(1.0, 0.0)
    assert not torch.equal(plain[0], plain[1])
    torch.testing.assert_close(scores(0.25, 0.0), 0.25 * plain)
    torch.testing.assert_close(scores(0.25, 2.0), 0.25 * plain + torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(scores(0.0, 2.0), torch.tensor([2.0, 0.0]))


def test_stage_ptx_rows_train_on_answers_and_count_what_they_skip(tokenizer, capsys):
    """Text rows train on every token; prompt/completion and messages rows on the answer and its end token only."""
    from pipeline.stages.ppo import ptx_rows

    user, answer = [{"role": "user", "content": "one two"}], [{"role": "assistant", "content": "three"}]
    rows = [{"text": "the cat"}, {"prompt": "one two", "completion": " three"}, {"messages": user + answer},
            {"prompt": user, "completion": answer}]
    text, plain, messages, conversational = ptx_rows(rows, tokenizer, max_length=64)
    eos = tokenizer.eos_token_id
    assert text["input_ids"] == tokenizer("the cat", add_special_tokens=False).input_ids + [eos]
    assert text["labels"] == text["input_ids"]
    trained = tokenizer(" three", add_special_tokens=False).input_ids + [eos]
    prompt_length = len(tokenizer("one two", add_special_tokens=False).input_ids)
    assert plain["labels"] == [-100] * prompt_length + trained
    assert messages == conversational  # the two chat shapes render and mask alike
    labelled = [t for t in messages["labels"] if t != -100]
    assert tokenizer.decode(labelled).strip() == "three<|eos|>" and labelled == messages["input_ids"][-len(labelled):]

    cut = ptx_rows(rows, tokenizer, max_length=3)  # the chat rows end before their answer starts
    assert [r["input_ids"] for r in cut] == [text["input_ids"], plain["input_ids"][:3]]
    assert "2 of 4 rows have no trained token within ptx_max_length=3" in capsys.readouterr().out


def test_stage_ptx_settings_fail_clearly(tokenizer):
    from pipeline.stages.ppo import PPOArguments, load_ptx

    with pytest.raises(ValueError, match="ptx_coef=0.5 needs ptx_dataset"):
        load_ptx(PPOArguments(), PPOConfig(ptx_coef=0.5), tokenizer)
    preference = {"sources": [{"path": "demo:preference?n=5"}]}
    with pytest.raises(ValueError, match="ptx_dataset: PPO-ptx needs text, messages or prompt/completion"):
        load_ptx(PPOArguments(ptx_dataset=preference), PPOConfig(ptx_coef=0.5), tokenizer)
    assert load_ptx(PPOArguments(ptx_dataset=preference), PPOConfig(ptx_coef=0.0), tokenizer) == (None, [])
    rows, records = load_ptx(PPOArguments(ptx_dataset={"sources": [{"path": "demo:sft?n=5"}]}),
                             PPOConfig(ptx_coef=0.5), tokenizer)
    assert len(rows) == 5 and records[0]["name"] == "demo:sft?n=5" and records[0]["license"] == "apache-2.0"


def test_stage_rejects_a_negative_thread_count():
    from pipeline.stages.ppo import PPOArguments, run_ppo

    with pytest.raises(ValueError, match="cpu_threads: must be >= 0"):
        run_ppo(PPOArguments(cpu_threads=-1), PPOConfig())


@pytest.mark.parametrize("engine", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_stage_refuses_an_adapter_policy_under_a_sharded_engine_before_loading(engine, monkeypatch, tmp_path):

    import pipeline.stages.ppo as stage

    monkeypatch.setenv(engine, "true")  # what `accelerate launch --config_file fsdp2.yaml/deepspeed_*.yaml` sets
    monkeypatch.setattr(stage, "check_distributed_setup", lambda _: None)  # as on a GPU machine (CPU refuses FSDP)
    missing = str(tmp_path / "no-model-here")  # nothing is loaded: the check comes first
    with pytest.raises(ValueError, match="method: lora .* under FSDP or DeepSpeed is not supported"):
        stage.run_ppo(stage.PPOArguments(method="lora", model_name_or_path=missing, reward_model_path=missing),
                PPOConfig(output_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


# --- rollout options: chunked rollouts, unwhitened advantages, the k3 estimator, top_k ----------------------------

def rollout(trainer, step: int = 0) -> dict:
    with torch.no_grad():
        return trainer._rollout(step)


def test_top_k_one_samples_the_greedy_answer(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path / "k1", top_k=1)
    out = rollout(trainer)["batch"]
    with torch.no_grad():  # the policy's own greedy continuation of the same (left-padded) prompts
        greedy = trainer.policy.generate(input_ids=out["query"], attention_mask=out["query_mask"], do_sample=False,
                                         max_new_tokens=6, eos_token_id=2, pad_token_id=0)
    width = out["query"].shape[1]
    for row, mask, expected in zip(out["response"], out["response_mask"], greedy[:, width:]):
        n = int(mask.sum())
        assert row[:n].tolist() == expected[:n].tolist()
    # top_k=3: every sampled token is one of the 3 most likely under the policy at its position
    trainer = make_trainer(tokenizer, tmp_path / "k3", top_k=3)
    out = rollout(trainer)["batch"]
    ids = torch.cat([out["query"], out["response"]], 1)
    with torch.no_grad():
        logits = trainer.policy(input_ids=ids, attention_mask=torch.cat([out["query_mask"], out["response_mask"]],
                                                                         1)).logits
    top3 = logits[:, width - 1:-1].topk(3, dim=-1).indices  # (B, T, 3): the candidates for each response token
    chosen = (top3 == out["response"].unsqueeze(-1)).any(-1)
    assert chosen[out["response_mask"].bool()].all()


def test_rollout_in_chunks_equals_one_batch(tokenizer, tmp_path):
    """rollout_batch_size=1: each chunk has its own prompt width and is left-padded again before they are joined."""
    whole = rollout(make_trainer(tokenizer, tmp_path / "whole", top_k=1))  # top_k=1: sampling cannot differ
    chunked = rollout(make_trainer(tokenizer, tmp_path / "chunked", top_k=1, rollout_batch_size=1))
    assert (whole["batch"]["query_mask"] == 0).any()  # prompts of 2-4 tokens: the joined batch is padded
    assert whole["batch"].keys() == chunked["batch"].keys()
    for key, value in whole["batch"].items():
        torch.testing.assert_close(chunked["batch"][key], value, atol=1e-5, rtol=1e-5, msg=key)
    for key, value in whole["stats"].items():
        torch.testing.assert_close(chunked["stats"][key], value, atol=1e-5, rtol=1e-5, msg=key)


def test_whiten_advantages_false_keeps_the_gae_advantages(tokenizer, tmp_path):
    raw = rollout(make_trainer(tokenizer, tmp_path / "raw", whiten_advantages=False, top_k=1))["batch"]
    white = rollout(make_trainer(tokenizer, tmp_path / "white", top_k=1))["batch"]
    mask = raw["response_mask"].bool()
    # GAE's identity: return = advantage + value on every real token (whitening touches only the advantages)
    torch.testing.assert_close((raw["advantages"] + raw["values"])[mask], raw["returns"][mask])
    torch.testing.assert_close(white["returns"], raw["returns"])
    a = raw["advantages"][mask]
    assert abs(a.mean().item()) > 1e-3  # unwhitened: not centred
    expected = (a - a.mean()) / a.std(unbiased=True)  # whitened: centred and scaled (Bessel-corrected)
    torch.testing.assert_close(white["advantages"][mask], expected, atol=1e-4, rtol=1e-4)


def test_score_after_eos_trains_the_critic_one_state_further(tokenizer, tmp_path):
    scores = lambda prompts_ids, responses_ids: torch.arange(len(responses_ids), dtype=torch.float32)  # noqa: E731
    settings = dict(reward_fn=scores, whiten_advantages=False, batch_size=8, response_length=12)  # some rows end
    eos = rollout(make_trainer(tokenizer, tmp_path / "eos", score_after_eos=False, **settings))
    after = rollout(make_trainer(tokenizer, tmp_path / "after", **settings))  # on by default
    a, b = after["batch"], eos["batch"]
    mask, value_mask = a["response_mask"], a["value_mask"]
    assert torch.equal(a["response"], b["response"])  # the same seed samples the same responses
    assert torch.equal(b["value_mask"], mask)  # off: no extra state
    extra = (value_mask - mask).bool()
    ended = mask.sum(1) < mask.shape[1]
    assert extra.sum(1).tolist() == ended.long().tolist()  # one extra state per row that ended early
    assert ended.any()
    rows = torch.nonzero(ended).squeeze(1)
    # the extra state's return is the score (nothing follows it), its advantage 0 (no action is taken there)
    torch.testing.assert_close(a["returns"][extra], rows.float())
    assert (a["advantages"][extra] == 0).all()
    # its value is the critic's at the EOS token (kept, not masked), and the other values are unchanged
    assert (a["values"][extra] != 0).all()
    torch.testing.assert_close(a["values"] * mask, b["values"])
    # GAE's identity on the tokens (whitening is off), and the return before EOS bootstraps from V'
    torch.testing.assert_close((a["advantages"] + a["values"])[mask.bool()], a["returns"][mask.bool()])
    assert not torch.allclose(a["returns"][mask.bool()], b["returns"][mask.bool()])
    after_trainer = make_trainer(tokenizer, tmp_path / "t", reward_fn=scores, score_after_eos=True, max_steps=1)
    assert after_trainer.train()[0]["value_loss"] > 0


def test_k3_kl_is_the_non_negative_estimator_of_the_sampled_log_ratio(tokenizer, tmp_path):
    k3 = rollout(make_trainer(tokenizer, tmp_path / "k3", scramble=True, kl_estimator="k3", top_k=1))
    k1 = rollout(make_trainer(tokenizer, tmp_path / "k1", scramble=True, top_k=1))
    batch, mask = k3["batch"], k3["batch"]["response_mask"]
    log_ratio = (batch["logprobs"] - batch["ref_logprobs"]) * mask  # policy (scrambled) != reference
    per_token = (torch.exp(-log_ratio) - 1 + log_ratio) * mask  # k3 = (r - 1) - log r, r = p_ref / p
    assert (per_token >= 0).all() and (per_token <= log_ratio.clamp(min=0) + 1e-6).all()  # 0 <= k3 < k1 for k1 > 0
    assert (log_ratio[mask.bool()] > 0.1).all()  # the policy really differs from its reference
    assert k3["stats"]["kl"].item() == pytest.approx(per_token.sum(1).mean().item(), rel=1e-5)
    assert k1["stats"]["kl"].item() == pytest.approx(log_ratio.sum(1).mean().item(), rel=1e-5)
    torch.testing.assert_close(k1["batch"]["logprobs"], batch["logprobs"])  # same rollout, only the estimator differs
    assert k3["stats"]["kl"].item() > 0


@pytest.mark.parametrize("architecture", [{}, {"key_smear": 2}], ids=["llama", "key_smear"])
def test_log_probs_from_generation_equal_a_forward_pass(tokenizer, tmp_path, architecture):
    """The rollout takes the policy's log-probs from the logits `generate` computed; they match a separate forward
    pass over the finished rows (the other setting) within 1e-5 in float32, prompts of unequal length included."""
    rollouts = {}
    for source in ("generation", "forward"):
        trainer = make_trainer(tokenizer, tmp_path / source, rollout_logprobs=source, architecture=architecture,
                               batch_size=8, mini_batch_size=4, response_length=8)
        assert trainer._logprobs_from_generation == (source == "generation")
        torch.manual_seed(3)
        rollouts[source] = trainer._rollout(0)["batch"]
    generated, forward = rollouts["generation"], rollouts["forward"]
    assert torch.equal(generated["response"], forward["response"])  # the same samples
    assert generated["response_mask"].sum() > 8 and len(set(map(len, prompts()))) > 1
    torch.testing.assert_close(generated["logprobs"], forward["logprobs"], atol=1e-5, rtol=0)
    torch.testing.assert_close(generated["values"], forward["values"], atol=1e-5, rtol=0)
    assert torch.equal(generated["logprobs"] == 0, forward["logprobs"] == 0)  # padding after EOS stays 0


def test_policy_and_reference_log_probs_share_the_autocast_context(tokenizer, tmp_path):
    """Under bf16 mixed precision the policy (inside the prepared module) and the reference both run under the
    accelerator's autocast, so the step-1 KL of policy == reference is zero, not bf16 rounding noise. `auto` takes
    the rollout log-probs from a forward pass here: cached low-precision generation logits differ from it."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # the process-wide state is fp32 elsewhere
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    try:
        recorded_rollouts(make_trainer(tokenizer, tmp_path, accelerator=accelerator, max_steps=1), accelerator)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def recorded_rollouts(trainer, accelerator):
    assert not trainer._logprobs_from_generation
    entered = []
    autocast = accelerator.autocast

    def recording_autocast(*args, **kwargs):
        entered.append(torch.is_autocast_enabled("cpu"))
        return autocast(*args, **kwargs)

    accelerator.autocast = recording_autocast
    batch = trainer._rollout(0)["batch"]
    assert entered, "the reference log-probs were computed outside accelerator.autocast()"
    kl = (batch["logprobs"] - batch["ref_logprobs"]) * batch["response_mask"]
    assert kl.abs().max().item() <= 1e-6
    # Control: the reference outside autocast (float32) differs from the bf16 policy by far more than that.
    accelerator.autocast = lambda *a, **k: nullcontext()
    torch.manual_seed(0)
    batch = trainer._rollout(0)["batch"]
    assert ((batch["logprobs"] - batch["ref_logprobs"]) * batch["response_mask"]).abs().max().item() > 1e-4


def test_learning_rate_schedules_and_value_warmup(tokenizer, tmp_path):
    """`lr_scheduler_type` scales both groups once per PPO step; `value_warmup_steps` keeps the policy still (its
    learning rate 0) while the value model trains."""
    trainer = make_trainer(tokenizer, tmp_path, max_steps=4, lr_scheduler_type="linear", value_warmup_steps=1,
                           learning_rate=1e-3, value_learning_rate=2e-3, save_steps=1)
    before = parameters(trainer)
    history = trainer.train()
    trainer.load_checkpoint(tmp_path / "checkpoint-1")
    after = parameters(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("policy."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("value."))
    # linear: 1 - step / max_steps for the value group; the policy's history shows its own (0 during warmup)
    assert [h["learning_rate"] for h in history] == pytest.approx([0.0, 1e-3 * 3 / 4, 1e-3 * 2 / 4, 1e-3 * 1 / 4])
    # the checkpoint of step 1 restored the schedule too: the value group's rate for step 2
    assert trainer.optimizer.param_groups[1]["lr"] == pytest.approx(2e-3 * 3 / 4)
    with pytest.raises(ValueError, match="lr_scheduler_type must be one of"):
        PPOConfig(lr_scheduler_type="exponential")


def test_kl_in_the_loss_leaves_the_reward_to_the_score(tokenizer, tmp_path):
    """kl_penalty="loss": the per-token rewards (so the advantages) hold the score alone, whatever the coefficient,
    and the coefficient enters the policy loss instead; kl_penalty="reward" puts it in the rewards."""
    def rollout(mode, coef):
        trainer = make_trainer(tokenizer, tmp_path / f"{mode}{coef}", scramble=True, kl_penalty=mode,
                               init_kl_coef=coef, whiten_advantages=False, kl_estimator="k3")
        torch.manual_seed(5)
        return trainer, trainer._rollout(0)["batch"]

    _, loss_free = rollout("loss", 0.0)
    trainer, loss_heavy = rollout("loss", 5.0)
    _, reward_heavy = rollout("reward", 5.0)
    assert (loss_heavy["logprobs"] - loss_heavy["ref_logprobs"]).abs().max() > 1e-3  # policy != reference
    torch.testing.assert_close(loss_heavy["advantages"], loss_free["advantages"], atol=0, rtol=0)
    assert (reward_heavy["advantages"] - loss_free["advantages"]).abs().max() > 1e-2
    rows = torch.arange(2)
    tokens = loss_heavy["response_mask"][rows].sum().float()
    with_kl = trainer._micro_step(loss_heavy, rows, (tokens, tokens), 0)["policy_loss"]
    trainer.config.kl_penalty = "reward"
    trainer.optimizer.zero_grad()
    without = trainer._micro_step(loss_heavy, rows, (tokens, tokens), 0)["policy_loss"]
    # first epoch: ratio 1, so the policy's k3 KL to the reference is the batch's; 5 x its token mean is the gap
    k3 = kl_estimate(loss_heavy["logprobs"], loss_heavy["ref_logprobs"], "k3")[rows]
    expected = 5.0 * (k3 * loss_heavy["response_mask"][rows]).sum().item() / tokens.item()
    assert with_kl - without == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="kl_penalty must be"):
        PPOConfig(kl_penalty="both")


def test_evaluate_scores_held_out_prompts_in_chunks_and_keeps_the_random_state(tokenizer, tmp_path):
    calls = []

    def recording(prompts_ids, responses_ids):
        scores = torch.tensor([len(r) / 10 for r in responses_ids])  # a score each response earns on its own
        calls.append((len(prompts_ids), scores))
        return scores

    trainer = make_trainer(tokenizer, tmp_path, reward_fn=recording)
    state = torch.get_rng_state()
    result = trainer.evaluate(prompts(6), batch_size=4)
    assert torch.equal(torch.get_rng_state(), state)  # training's sampling continues as if nothing ran
    assert [n for n, _ in calls] == [4, 2] and result["samples"] == 6
    scores = torch.cat([s for _, s in calls])
    assert result["reward"] == pytest.approx(scores.mean().item())
    assert result["response_length"] == pytest.approx(scores.mean().item() * 10)  # the score is the length / 10
    assert abs(result["kl"]) < 1e-5  # the policy is still the reference


def test_a_reward_fn_without_one_finite_score_per_response_stops_with_where(tokenizer, tmp_path):
    short = make_trainer(tokenizer, tmp_path / "short", reward_fn=lambda p, r: torch.zeros(len(r) - 1))
    with pytest.raises(RuntimeError, match=r"evaluate: reward_fn must return one finite score per response \(4\)"):
        short.evaluate(prompts(4))
    nan = make_trainer(tokenizer, tmp_path / "nan", reward_fn=lambda p, r: torch.full((len(r),), float("nan")))
    with pytest.raises(RuntimeError, match=r"PPO step 1: reward_fn must return one finite score per response"):
        nan.train()
