"""PipelineGPT as a transformers citizen: Auto classes, save/load, remote code, PEFT, bitsandbytes, checkpointing."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

import pipeline  # noqa: F401  (registers the Auto classes)
from pipeline.modeling import (
    PipelineGPTConfig,
    PipelineGPTForCausalLM,
    PipelineGPTForSequenceClassification,
    PipelineGPTModel,
)

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
HEADS = {
    "AutoModel": (PipelineGPTModel, AutoModel),
    "AutoModelForCausalLM": (PipelineGPTForCausalLM, AutoModelForCausalLM),
    "AutoModelForSequenceClassification": (PipelineGPTForSequenceClassification, AutoModelForSequenceClassification),
}


def build(head_class, preset="llama", **overrides):
    torch.manual_seed(0)
    return head_class(PipelineGPTConfig.preset(preset, **{**TINY, **overrides})).eval()


def output_of(model, x):
    out = model(x, attention_mask=torch.ones_like(x))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


X = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(0))


def test_import_registers_every_head_with_auto_classes():
    config = AutoConfig.for_model("pipeline_gpt", **TINY)
    assert isinstance(config, PipelineGPTConfig)
    for head_class, auto_class in HEADS.values():
        assert type(auto_class.from_config(config)) is head_class


@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("preset", ["llama", "gpt2"])
def test_save_load_round_trip_every_head(tmp_path, head, preset):
    head_class, auto_class = HEADS[head]
    model = build(head_class, preset)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "pipeline_gpt"
    assert set(saved["auto_map"]) == {"AutoConfig", *HEADS}  # every head, whichever was saved
    assert (tmp_path / "modeling_pipeline_gpt.py").is_file()
    assert (tmp_path / "configuration_pipeline_gpt.py").is_file()
    loaded = auto_class.from_pretrained(tmp_path).eval()
    assert type(loaded) is head_class
    torch.testing.assert_close(output_of(loaded, X), output_of(model, X), atol=0, rtol=0)


CLEAN_LOAD = textwrap.dedent("""
    import sys, json
    sys.modules["pipeline"] = None  # the project package must not be importable here
    try:
        import pipeline
        raise SystemExit("pipeline importable")
    except ImportError:
        pass
    import torch, transformers
    for path, auto_name, out in json.loads(sys.argv[1]):  # every head in this one process
        auto_class = getattr(transformers, auto_name)
        model = auto_class.from_pretrained(path, trust_remote_code=True).eval()
        x = torch.load(path + "/x.pt", weights_only=True)
        with torch.no_grad():
            result = model(x, attention_mask=torch.ones_like(x))
            as_tuple = model(x, attention_mask=torch.ones_like(x), return_dict=False)  # the remote code's tuple
        tensor = result.logits if hasattr(result, "logits") else result.last_hidden_state
        torch.save([tensor, as_tuple[0]], out)
        print(auto_name, type(model).__module__, type(model).__name__)
        if auto_name == "AutoModelForCausalLM":
            generated = model.generate(x[:, :3], max_new_tokens=3, do_sample=False, eos_token_id=None,
                                       pad_token_id=0)
            print("generated", tuple(generated.shape))
""")


@pytest.fixture(scope="module")
def clean_loads(tmp_path_factory):
    """Every head saved with smeared keys and loaded through its remote code in ONE fresh process."""
    root = tmp_path_factory.mktemp("clean")
    models, jobs = {}, []
    for head in sorted(HEADS):
        model = build(HEADS[head][0], "qk_norm", key_smear=2)
        with torch.no_grad():  # gates away from their initial value, so a load that re-initialised them would show
            for layer in getattr(model, "model", model).layers:
                layer.self_attn.key_smear.copy_(torch.tensor([[-1.5, 2.5, 0.3], [0.7, -0.2, 1.1]]))
        folder = root / head
        model.save_pretrained(folder)
        torch.save(X, folder / "x.pt")
        models[head] = model
        jobs.append([str(folder), head, str(root / f"{head}.pt")])
    script = root / "load.py"
    script.write_text(CLEAN_LOAD)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(root / "modules"))
    outside = root / "elsewhere"
    outside.mkdir()
    proc = subprocess.run([sys.executable, "-P", str(script), json.dumps(jobs)], cwd=outside, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, models, proc.stdout


@pytest.mark.parametrize("head", sorted(HEADS))
def test_clean_process_loads_through_remote_code(clean_loads, head):
    root, models, stdout = clean_loads
    head_class = HEADS[head][0]
    (line,) = [line for line in stdout.splitlines() if line.startswith(head + " ")]
    _, module, name = line.split()
    assert module.startswith("transformers_modules.") and name == head_class.__name__
    if head == "AutoModelForCausalLM":
        assert "generated (2, 6)" in stdout
    loaded, first_of_tuple = torch.load(root / f"{head}.pt", weights_only=True)
    expected = output_of(models[head], X).detach()
    torch.testing.assert_close(loaded, expected, atol=0, rtol=0)
    torch.testing.assert_close(first_of_tuple, expected, atol=0, rtol=0)  # return_dict=False: logits come first


def test_reward_model_from_causal_checkpoint_keeps_backbone(tmp_path):
    causal = build(PipelineGPTForCausalLM)
    causal.save_pretrained(tmp_path)
    reward = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=1)
    for name, weight in causal.model.state_dict().items():
        assert torch.equal(reward.model.state_dict()[name], weight), name


def test_gradient_checkpointing_gives_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = build(PipelineGPTForCausalLM).train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        model(X, labels=X).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=0)


def test_lora_all_linear_trains_only_adapters():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build(PipelineGPTForCausalLM).train(),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    targeted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if "lora_A" in n}
    assert targeted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model(X, labels=X).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), f"{name} changed although frozen"


def test_qlora_nf4_on_cpu_backward(tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    build(PipelineGPTForCausalLM, hidden_size=128, intermediate_size=256).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu")
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    loss = model(X, labels=X).loss
    assert torch.isfinite(loss)
    loss.backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    lora_a_grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert lora_grads and all(g is not None and torch.isfinite(g).all() for g in lora_grads)
    assert any(g.abs().sum() > 0 for g in lora_grads)
    assert all(g is not None for g in lora_a_grads)
