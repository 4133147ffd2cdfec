"""The quickstart stage writes a loadable model atomically and refuses to overwrite a finished one."""

import subprocess
import sys

import torch

import pipeline  # noqa: F401  (local classes, to compare with the remote-code load)
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO
from test_docs import TINY

QUICKSTART = [sys.executable, "recipes/quickstart.py", *TINY["python recipes/quickstart.py"].split()]


def test_quickstart_output_loads_and_is_not_overwritten(tmp_path):
    out = tmp_path / "quickstart"
    first = subprocess.run(QUICKSTART + ["--output_dir", str(out)], cwd=REPO, capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert not (tmp_path / "quickstart.incomplete").exists()
    assert "expected" in first.stdout  # greedy answers to held-out questions were printed
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.eos_token_id == tokenizer.eos_token_id == model.generation_config.eos_token_id
    ids = tokenizer("What is 12 plus 3?", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
    weights = out / "model.safetensors"
    before = weights.stat().st_mtime_ns

    second = subprocess.run(QUICKSTART + ["--output_dir", str(out)], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert second.returncode != 0
    assert "already exists" in second.stderr and "--overwrite" in second.stderr
    assert weights.stat().st_mtime_ns == before
    torch.testing.assert_close(model(ids).logits, AutoModelForCausalLM.from_pretrained(out)(ids).logits)
