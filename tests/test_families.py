"""Bring your own model: third-party families (Llama, Qwen2, Mistral, GPT-2) with their own chat templates through
SFT -> merge -> reward -> DPO -> PPO -> export -> a clean process that loads the export without remote code."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from conftest import REPO
from families import (
    FAMILIES, HISTORY_REWRITING_TEMPLATE, family_tokenizer, save_family,
)
from pipeline.data.chat_templates import (
    BUILTIN_TEMPLATES, ChatTemplateError, assistant_tokens, check_train_serve_parity, end_of_turn_token,
    ensure_pad_token, load_chat_tokenizer, stop_token_ids, use_chat_template,
)

CONFIGS = REPO / "recipes" / "configs" / "demo"
CONVERSATION = [{"role": "user", "content": "What is 3 plus 4?"}, {"role": "assistant", "content": "It is 7."},
                {"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello there!"}]


def masked_spans(tokenizer, ids, mask) -> list[list[str]]:
    spans, current = [], []
    for token, bit in zip(tokenizer.convert_ids_to_tokens(ids), mask):
        if bit:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


# Hand-checked: each reply's tokens and the token that closes the turn, nothing of the prompts or role headers.
EXPECTED_SPANS = {
    "qwen2": [["It", "Ġis", "Ġ7", ".", "<|im_end|>"], ["He", "llo", "Ġthere", "!", "<|im_end|>"]],
    "llama": [["It", "Ġis", "Ġ7", ".", "<|eot_id|>"], ["He", "llo", "Ġthere", "!", "<|eot_id|>"]],
    "mistral": [["\u2581It", "\u2581is", "\u25817.", "</s>"], ["\u2581Hello", "\u2581the", "re", "!", "</s>"]],
    "gpt2": [["It", "Ġis", "Ġ7", ".", "<|im_end|>"], ["He", "llo", "Ġthere", "!", "<|im_end|>"]],  # chatml chosen
}
END_OF_TURN = {"qwen2": "<|im_end|>", "llama": "<|eot_id|>", "mistral": "</s>", "gpt2": "<|im_end|>"}


def chat_tokenizer(family: str):
    tokenizer = family_tokenizer(family)
    use_chat_template(tokenizer, "chatml" if family == "gpt2" else None)
    ensure_pad_token(tokenizer)
    return tokenizer


@pytest.mark.parametrize("family", FAMILIES)
def test_assistant_mask_is_the_replies_and_their_end_of_turn(family):
    tokenizer = chat_tokenizer(family)
    ids, mask = assistant_tokens(tokenizer, CONVERSATION)
    assert ids == tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert masked_spans(tokenizer, ids, mask) == EXPECTED_SPANS[family]
    assert tokenizer.convert_ids_to_tokens(end_of_turn_token(tokenizer)) == END_OF_TURN[family]
    assert stop_token_ids(tokenizer)[0] == end_of_turn_token(tokenizer)
    assert tokenizer.eos_token_id in stop_token_ids(tokenizer)
    assert check_train_serve_parity(tokenizer) == 5  # assistant turns in the probe conversations


def test_our_mask_equals_the_generation_marker_mask_on_our_template():
    from pipeline.data.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(["What is 3 plus 4? It is 7. Say hello. Hello there!"] * 5, vocab_size=300,
                                show_progress=False)
    marked = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True,
                                           return_assistant_tokens_mask=True)
    tokenizer.chat_template = BUILTIN_TEMPLATES["pipeline"][0].replace("{%- generation -%}", "").replace(
        "{%- endgeneration -%}", "")  # the same rendering without markers: located by rendering instead
    ids, mask = assistant_tokens(tokenizer, CONVERSATION)
    assert (ids, mask) == (marked["input_ids"], marked["assistant_masks"])
    assert sum(mask) > 0


def test_a_base_model_needs_a_template_and_the_error_names_the_key():
    tokenizer = family_tokenizer("gpt2")
    with pytest.raises(ChatTemplateError, match=r"^chat_template: the tokenizer has no chat template.*chatml"):
        use_chat_template(tokenizer, None)
    with pytest.raises(ChatTemplateError, match=r"chat_template: 'chatmel' is neither a built-in template"):
        use_chat_template(tokenizer, "chatmel")
    with pytest.raises(ChatTemplateError, match=r"chat_template: no template file at .*missing.jinja"):
        use_chat_template(tokenizer, "missing.jinja")


def test_a_template_file_and_added_role_tokens(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text(BUILTIN_TEMPLATES["zephyr"][0])
    tokenizer = family_tokenizer("gpt2")
    assert use_chat_template(tokenizer, str(path)) == []  # zephyr closes turns with eos: nothing to add
    assert tokenizer.chat_template == BUILTIN_TEMPLATES["zephyr"][0]
    before = len(tokenizer)
    assert use_chat_template(tokenizer, "llama3") == ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    assert len(tokenizer) == before + 3


def test_a_template_that_rewrites_history_is_refused_with_the_fix():
    tokenizer = family_tokenizer("mistral")
    tokenizer.chat_template = HISTORY_REWRITING_TEMPLATE
    conversation = [{"role": "system", "content": "Be brief."}, *CONVERSATION]
    with pytest.raises(ChatTemplateError, match=r"row 3: the chat template renders the prompt of assistant turn 2 "
                                                r"differently with and without the reply .*chat_template: NAME"):
        assistant_tokens(tokenizer, conversation, where="row 3")
    # Like templates that drop earlier turns' reasoning: an earlier reply is shortened once another turn follows.
    tokenizer.chat_template = (
        "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{{- '[INST] ' + m['content'] + ' [/INST]' -}}"
        "{%- else -%}{{- ' ' + (m['content'] if loop.last else m['content'].split(' ')[0]) + eos_token -}}"
        "{%- endif -%}{%- endfor -%}")
    with pytest.raises(ChatTemplateError, match=r"row 0: the chat template rewrites assistant turn 1 once later "
                                                r"turns follow .*chat_template: NAME"):
        assistant_tokens(tokenizer, CONVERSATION, where="row 0")


def test_a_missing_pad_token_is_chosen_and_said(capsys):
    tokenizer = family_tokenizer("llama")
    ensure_pad_token(tokenizer)
    assert tokenizer.pad_token == "<|finetune_right_pad_id|>"
    assert "padding with '<|finetune_right_pad_id|>'" in capsys.readouterr().out


def test_greedy_generation_stops_at_the_end_of_turn(tmp_path):
    """A model whose every next token is <|im_end|> (eos is <|endoftext|>) stops after one token when the stop ids
    come from the template, and would run to the length limit on eos alone."""
    torch.manual_seed(0)
    save_family("qwen2", tmp_path / "m")
    tokenizer = load_chat_tokenizer(str(tmp_path / "m"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    eot = end_of_turn_token(tokenizer)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    torch.nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.zero_()
        head.bias[eot] = 1.0
    model.lm_head = head
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    n = prompt["input_ids"].shape[1]

    def new_tokens(stops):
        config = GenerationConfig(do_sample=False, max_new_tokens=6, eos_token_id=stops,
                                  pad_token_id=tokenizer.pad_token_id)
        return model.generate(**prompt, generation_config=config)[0, n:].tolist()

    assert new_tokens(stop_token_ids(tokenizer)) == [eot]
    assert new_tokens([tokenizer.eos_token_id]) == [eot] * 6


# --------------------------------------------------------------------------- the whole chain, per family


def stage_args(stage: str, *argv: str, config=None):
    from pipeline.stages.common import parse_stage_args

    module = __import__(f"pipeline.stages.{stage}", fromlist=["x"])
    classes = {"sft": ("SFTArguments", "trl.SFTConfig", "run_sft"),
               "reward": ("RewardArguments", "trl.RewardConfig", "run_reward"),
               "dpo": ("DPOArguments", "trl.DPOConfig", "run_dpo"),
               "ppo": ("PPOArguments", "pipeline.alignment.ppo_trainer.PPOConfig", "run_ppo")}[stage]
    owner, _, name = classes[1].rpartition(".")
    config_class = getattr(__import__(owner, fromlist=[name]), name)
    config = config or CONFIGS / f"{stage}.yaml"
    gpu_only = "bf16: true" in config.read_text() and not torch.cuda.is_available()
    args = parse_stage_args((getattr(module, classes[0]), config_class),
                            ["--config", str(config), *argv, *(["--bf16", "false"] if gpu_only else [])])
    return getattr(module, classes[2]), args


def run(stage: str, *argv: str, config=None):
    function, args = stage_args(stage, *argv, config=config)
    return function(*args)


TINY = ["--max_steps", "2", "--save_steps", "2", "--logging_steps", "1", "--max_length", "96"]
CHAINS = [("llama", "full", None), ("qwen2", "lora", None), ("mistral", "lora", None), ("gpt2", "full", "chatml")]


@pytest.mark.parametrize("family,method,template", CHAINS, ids=[c[0] for c in CHAINS])
def test_family_chain_to_an_export_that_loads_without_remote_code(family, method, template, tmp_path):
    base = save_family(family, tmp_path / "base")
    choose = ["--chat_template", template] if template else []
    sft = run("sft", "--output_dir", str(tmp_path / "sft"), "--model_name_or_path", str(base), "--method", method,
              "--dataset_path", "demo:sft?n=40", "--per_device_train_batch_size", "4", "--eval_demo_tasks", "4",
              "--lora_r", "4", "--lora_alpha", "8", *choose, *TINY)
    manifest = json.loads((sft / "pipeline_manifest.json").read_text())
    assert manifest["parent"]["stage"] is None and len(manifest["parent"]["config_sha256"]) == 64
    assert list(manifest["parent"]["weights_sha256"]) == ["model.safetensors"]
    if method != "lora":  # a full SFT output generates up to the end of turn wherever it is loaded
        eos = json.loads((sft / "generation_config.json").read_text())["eos_token_id"]
        assert (eos if isinstance(eos, list) else [eos]) == stop_token_ids(load_chat_tokenizer(str(sft)))
    if method == "lora":
        from pipeline.stages.merge import merge_adapter

        sft = merge_adapter(str(sft), str(tmp_path / "sft-merged"))
    reward = run("reward", "--output_dir", str(tmp_path / "reward"), "--model_name_or_path", str(sft),
                 "--dataset_path", "demo:preference?n=32",
                 "--per_device_train_batch_size", "4", *TINY)
    run("dpo", "--output_dir", str(tmp_path / "dpo"), "--model_name_or_path", str(sft),
        "--dataset_path", "demo:preference?n=24", "--on_policy_samples", "0",
        "--per_device_train_batch_size", "4", "--eval_demo_tasks", "0", *TINY)
    ppo = run("ppo", "--output_dir", str(tmp_path / "ppo"), "--model_name_or_path", str(sft),
              "--reward_model_path", str(reward), "--dataset_path", "demo:prompts?n=16", "--verifier_weight", "0",
              "--ptx_coef", "0", "--batch_size", "8", "--mini_batch_size", "4", "--max_steps", "1",
              "--response_length", "6", "--eval_demo_tasks", "4")

    from pipeline.hub.export import export_model

    export = export_model(ppo, tmp_path / "export")
    config = json.loads((export / "config.json").read_text())
    assert "auto_map" not in config and not (export / "modeling_pipeline_gpt.py").exists()
    tokenizer = load_chat_tokenizer(str(export))
    generation = json.loads((export / "generation_config.json").read_text())
    stops = generation["eos_token_id"] if isinstance(generation["eos_token_id"], list) else [generation["eos_token_id"]]
    assert stops == stop_token_ids(tokenizer)
    assert tokenizer.convert_ids_to_tokens(stops[0]) == END_OF_TURN[family]
    assert len(stops) == (1 if family == "mistral" else 2)  # Mistral closes turns with eos itself
    assert "trust_remote_code" not in (export / "README.md").read_text()

    clean = subprocess.run(
        [sys.executable, "-I", "-c",
         "import sys; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
         f"m = AutoModelForCausalLM.from_pretrained({str(export)!r}); t = AutoTokenizer.from_pretrained({str(export)!r})\n"
         "ids = t.apply_chat_template([{'role': 'user', 'content': 'Hi'}], add_generation_prompt=True, "
         "return_tensors='pt', return_dict=True)\n"
         "print(type(m).__name__, m.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] > 0)"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert clean.returncode == 0, clean.stderr[-2000:]
    assert clean.stdout.split()[-2:] == [type(AutoModelForCausalLM.from_pretrained(export)).__name__, "True"]


def test_an_export_whose_template_was_changed_is_refused(tmp_path):
    from pipeline.artifacts import StageOutput, build_manifest
    from pipeline.hub.export import export_model

    save_family("qwen2", tmp_path / "base")
    tokenizer = load_chat_tokenizer(str(tmp_path / "base"))
    with StageOutput(tmp_path / "sft") as out:
        AutoModelForCausalLM.from_pretrained(tmp_path / "base").save_pretrained(out.work)
        tokenizer.save_pretrained(out.work)
        out.finish(build_manifest("sft", artifact="model", config={}, parent_dir=tmp_path / "base",
                                  tokenizer=tokenizer))
    (tmp_path / "sft" / "chat_template.jinja").write_text(BUILTIN_TEMPLATES["zephyr"][0])  # where transformers 5 keeps it
    with pytest.raises(ChatTemplateError, match=r"sft: the tokenizer's chat template differs from the one this model "
                                                r"was trained with .*pipeline_manifest.json"):
        export_model(tmp_path / "sft", tmp_path / "export")
    assert not (tmp_path / "export").exists()


HUB_CONFIGS = REPO / "recipes" / "configs" / "hub"


def test_hub_configs_parse_to_their_settings():
    sft, training = stage_args("sft", config=HUB_CONFIGS / "sft_lora.yaml")[1]
    assert (sft.model_name_or_path, sft.method, sft.chat_template) == ("Qwen/Qwen2.5-0.5B-Instruct", "lora", None)
    assert sft.dataset["sources"][0]["path"] == "tatsu-lab/alpaca"
    assert (training.assistant_only_loss, training.max_length, training.learning_rate) == (True, 1024, 2e-4)
    qlora, qlora_training = stage_args("sft", config=HUB_CONFIGS / "sft_qlora.yaml")[1]
    assert (qlora.method, qlora_training.output_dir) == ("qlora", "outputs/hub/sft-qlora")
    reward, reward_training = stage_args("reward", config=HUB_CONFIGS / "reward.yaml")[1]
    assert (reward.model_name_or_path, reward.dataset["sources"][0]["path"]) == ("outputs/hub/sft-merged",
                                                                                "Anthropic/hh-rlhf")
    assert reward_training.output_dir == "outputs/hub/reward"
    ppo, ppo_config = stage_args("ppo", config=HUB_CONFIGS / "ppo.yaml")[1]
    assert (ppo.reward_model_path, ppo.verifier_weight, ppo_config.response_length) == ("outputs/hub/reward", 0.0, 128)
    dpo, dpo_training = stage_args("dpo", config=HUB_CONFIGS / "dpo.yaml")[1]
    assert (dpo.method, dpo_training.beta) == ("lora", 0.1)


def test_qlora_from_the_hub_config_on_a_tied_family(tmp_path, capsys):
    base = save_family("qwen2", tmp_path / "base")
    out = run("sft", "--output_dir", str(tmp_path / "sft"), "--model_name_or_path", str(base),
              "--dataset_path", "demo:sft?n=60", "--per_device_train_batch_size", "4",
              "--activation_checkpointing", "false", *TINY, config=HUB_CONFIGS / "sft_qlora.yaml")
    manifest = json.loads((out / "pipeline_manifest.json").read_text())
    assert (manifest["artifact"], manifest["config"]["stage"]["method"]) == ("adapter", "qlora")
    assert "lora_train_special_tokens: off for a model with tied input and output embeddings" in capsys.readouterr().out


def test_inspect_a_base_model_names_the_key_then_shows_the_chosen_template(tmp_path, capsys):
    from pipeline.cli import main

    base = save_family("gpt2", tmp_path / "base")
    capsys.readouterr()
    config = tmp_path / "sft.yaml"
    config.write_text(f"model_name_or_path: {base}\ndataset: {{sources: [{{path: 'demo:sft?n=10'}}], test_size: 0}}\n"
                      "assistant_only_loss: true\n")
    assert main(["data", "inspect", "--config", str(config), "-n", "1"]) != 0
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: chat_template: the tokenizer has no chat template")
    assert main(["data", "inspect", "--config", str(config), "-n", "1", "--chat_template", "zephyr"]) == 0
    out = capsys.readouterr().out
    assert "<|user|>" in out.split("[loss on]")[0]
    assert out.split("[loss on]")[1].splitlines()[0].endswith("<|endoftext|>'")  # zephyr closes replies with eos


def test_a_hub_parent_is_recorded_by_id_and_cached_revision(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    from pipeline.artifacts import build_manifest

    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "models--acme--tiny-chat" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--acme--tiny-chat" / "refs").mkdir()
    (tmp_path / "models--acme--tiny-chat" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    parent = build_manifest("sft", artifact="model", config={}, parent_dir="acme/tiny-chat")["parent"]
    assert parent == {"path": "acme/tiny-chat", "stage": None, "manifest_sha256": None, "hub_id": "acme/tiny-chat",
                      "revision": commit}


def test_hub_model_ids_are_told_from_missing_paths(tmp_path):
    from pipeline.artifacts import is_hub_model_id

    assert is_hub_model_id("gpt2") and is_hub_model_id("Qwen/Qwen2.5-0.5B-Instruct")
    assert not any(is_hub_model_id(p) for p in ("./gpt2", "/abs/model", "outputs/hub/sft/x", "org/", "", str(tmp_path)))
