"""PipelineGPT (llama preset) vs transformers' LlamaForCausalLM: same shape, same weights, one process.

Measures training tokens/s (forward + backward + AdamW step) and greedy decode tokens/s with the KV cache, and
prints our/theirs ratios. Runs alternate between the two models so machine noise hits both alike; the median of
the repeats is reported.

    python benchmarks/model_speed.py                 # default shape (hidden 256, 4 layers)
    python benchmarks/model_speed.py --hidden 512 --layers 8 --repeats 5
"""

import argparse
import json
import platform
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.modeling import PipelineGPTForCausalLM
from pipeline.modeling.convert import config_from_llama


def build_pair(args):
    torch.manual_seed(0)
    llama_config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 8 * 8,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq_len + args.new_tokens + args.prompt_len, tie_word_embeddings=True,
    )
    llama = LlamaForCausalLM(llama_config)
    ours = PipelineGPTForCausalLM(config_from_llama(llama_config))
    ours.load_state_dict(llama.state_dict())
    for model in (llama, ours):
        model.set_attn_implementation(args.attn)
    return {"pipeline_gpt": ours, "llama": llama}


def train_tokens_per_second(model, batch, steps):
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(batch, labels=batch).loss.backward()  # warm-up: allocator, kernels
    optimizer.zero_grad(set_to_none=True)
    start = time.perf_counter()
    for _ in range(steps):
        model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps * batch.numel() / (time.perf_counter() - start)


@torch.no_grad()
def decode_tokens_per_second(model, prompt, new_tokens):
    model.eval()
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                  pad_token_id=0, eos_token_id=None)
    model.generate(prompt, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
    start = time.perf_counter()
    out = model.generate(prompt, **kwargs)
    generated = (out.shape[1] - prompt.shape[1]) * prompt.shape[0]
    return generated / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv_heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--train_steps", type=int, default=5)
    parser.add_argument("--prompt_len", type=int, default=16)
    parser.add_argument("--decode_batch", type=int, default=4)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    models = build_pair(args)
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(1, args.vocab, (args.batch, args.seq_len), generator=generator)
    prompt = torch.randint(1, args.vocab, (args.decode_batch, args.prompt_len), generator=generator)
    results = {name: {"train": [], "decode": []} for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            results[name]["train"].append(train_tokens_per_second(model, batch, args.train_steps))
        for name, model in models.items():
            results[name]["decode"].append(decode_tokens_per_second(model, prompt, args.new_tokens))

    median = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in results.items()}
    params = sum(p.numel() for p in models["llama"].parameters())
    print(f"shape: hidden {args.hidden}, layers {args.layers}, heads {args.heads}/{args.kv_heads}, "
          f"vocab {args.vocab}, {params / 1e6:.2f}M params, attn {args.attn}, threads {torch.get_num_threads()}")
    print(f"train: batch {args.batch} x {args.seq_len}; decode: batch {args.decode_batch}, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens; median of {args.repeats}")
    print(f"{'':14}{'train tok/s':>14}{'decode tok/s':>14}")
    for name, m in median.items():
        print(f"{name:14}{m['train']:>14.0f}{m['decode']:>14.1f}")
    ratios = {k: median["pipeline_gpt"][k] / median["llama"][k] for k in ("train", "decode")}
    print(f"{'ratio':14}{ratios['train']:>13.3f}x{ratios['decode']:>13.3f}x   (PipelineGPT / LlamaForCausalLM)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "median": median, "ratios": ratios, "machine": platform.platform(),
                       "torch": torch.__version__}, f, indent=2)
    return ratios


if __name__ == "__main__":
    main()
