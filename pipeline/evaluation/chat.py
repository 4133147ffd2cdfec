"""`pipeline chat DIR`: talk to a model through its chat template, streaming tokens, stopping at EOS."""

from __future__ import annotations

import sys
from pathlib import Path
from threading import Thread

from pipeline.data.chat_templates import stop_token_ids
from pipeline.errors import ConfigError


def load_chat_model(path: str | Path, *, trust_remote_code: bool = False):
    """Model and tokenizer of `path`; code shipped in the folder runs only with `trust_remote_code=True`
    (PipelineGPT is registered by `import pipeline`, so our own folders load without it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import pipeline  # noqa: F401  (registers PipelineGPT)

    path = Path(path)
    if (path / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if not tokenizer.chat_template:
        raise ConfigError(f"{path}: the tokenizer has no chat template; chat needs a chat-tuned model")
    return model.eval(), tokenizer


def reply(model, tokenizer, history: list[dict], *, max_new_tokens: int = 128, temperature: float = 0.0,
          top_p: float = 1.0, top_k: int = 0, stream=None) -> str:
    """Generate the assistant's next turn for `history`; tokens are written to `stream` as they come."""
    from transformers import TextIteratorStreamer

    inputs = tokenizer.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k} if temperature > 0 \
        else {"do_sample": False}
    kwargs = dict(**inputs, max_new_tokens=max_new_tokens, eos_token_id=stop_token_ids(tokenizer),
                  pad_token_id=tokenizer.pad_token_id, streamer=streamer, **sampling)
    worker = Thread(target=model.generate, kwargs=kwargs)
    worker.start()
    pieces = []
    for piece in streamer:
        pieces.append(piece)
        if stream is not None:
            stream.write(piece)
            stream.flush()
    worker.join()
    return "".join(pieces).strip()


def chat_loop(path: str | Path, *, system: str | None = None, lines=None, out=sys.stdout,
              trust_remote_code: bool = False, **sampling) -> list[dict]:
    """Read user turns from `lines` (stdin by default) until EOF or /exit; returns the conversation."""
    model, tokenizer = load_chat_model(path, trust_remote_code=trust_remote_code)
    history = [{"role": "system", "content": system}] if system else []
    lines = lines if lines is not None else _stdin_lines(out)
    for line in lines:
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if not text:
            continue
        history.append({"role": "user", "content": text})
        out.write("assistant> ")
        answer = reply(model, tokenizer, history, stream=out, **sampling)
        out.write("\n")
        history.append({"role": "assistant", "content": answer})
    return history


def _stdin_lines(out):
    while True:
        out.write("you> ")
        out.flush()
        line = sys.stdin.readline()
        if not line:
            return
        yield line
