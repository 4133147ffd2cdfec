"""Scaling out on CPU: two "machines" on 127.0.0.1 through recipes/accelerate/multi_node.yaml train the same weights
as one process; GPU-only engines are refused on a machine without GPUs; shared folders are written by rank 0."""

import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from pipeline.data.demo_tasks import pretraining_corpus
from pipeline.data.tokenizer import train_tokenizer

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": str(REPO)}
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]
PRETRAIN = [str(REPO / "recipes" / "pretrain.py"), "--config", str(REPO / "recipes/configs/demo/pretrain.yaml"),
            "--dataset_path", "demo:pretrain?n=150", "--max_steps", "3", "--save_steps", "100", "--hidden_size", "64",
            "--num_hidden_layers", "2", "--num_attention_heads", "2", "--intermediate_size", "64",
            "--block_size", "32", "--logging_steps", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("scale") / "tokenizer"
    train_tokenizer(pretraining_corpus(150, seed=0), vocab_size=300, show_progress=False).save_pretrained(out)
    return out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path of the multi-node config")
def test_multi_node_config_as_two_machines_on_one_host_equals_one_process(tokenizer_dir, tmp_path):
    port = free_port()
    node = [*LAUNCH, "--config_file", str(REPO / "recipes/accelerate/multi_node.yaml"), "--num_machines", "2",
            "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
            "--mixed_precision", "no"]
    common = [*PRETRAIN, "--tokenizer_name_or_path", str(tokenizer_dir)]
    two = [*common, "--output_dir", str(tmp_path / "two"), "--per_device_train_batch_size", "2"]
    second = subprocess.Popen([*node, "--machine_rank", "1", *two], env=ENV, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = subprocess.run([*node, "--machine_rank", "0", *two], env=ENV, cwd=tmp_path, capture_output=True,
                           text=True, timeout=600)
    second_out, _ = second.communicate(timeout=600)
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-3000:] + second_out[-3000:]
    one = subprocess.run([*LAUNCH, "--num_processes", "1", "--cpu", *common, "--output_dir", str(tmp_path / "one"),
                          "--per_device_train_batch_size", "4"], env=ENV, cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key


def test_the_engine_check_reads_what_accelerate_launch_sets(monkeypatch):
    from pipeline.errors import LaunchError
    from pipeline.stages.common import check_distributed_setup

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(LaunchError, match="asks for DeepSpeed, which needs GPUs"):
        check_distributed_setup(None)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    check_distributed_setup(None)  # one plain process: nothing to refuse


WRITE_ONCE = """
import os, sys, time
from pathlib import Path
from pipeline.artifacts import write_once
folder = Path(sys.argv[1])
def write():
    time.sleep(1)  # slow enough that a second writer would overlap
    with open(folder / "writes.log", "a") as log:
        log.write(os.environ["RANK"] + "\\n")
    (folder / "done").touch()
write_once(write, done=lambda: (folder / "done").exists())
assert (folder / "done").exists(), "a rank went on before the write finished"
"""


def test_write_once_under_two_processes_writes_on_rank_zero_and_the_other_waits(tmp_path):
    script = tmp_path / "w.py"
    script.write_text(WRITE_ONCE)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), str(script), str(tmp_path)],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "writes.log").read_text() == "0\n"


def test_write_once_in_one_process_writes_only_when_not_done():
    from pipeline.artifacts import write_once

    calls = []
    write_once(lambda: calls.append(1), done=lambda: False)
    write_once(lambda: calls.append(2), done=lambda: True)
    assert calls == [1]


def launch_ppo(out, *flags, processes=2, check=True):
    command = [*LAUNCH, "--config_file", str(REPO / "recipes/accelerate/cpu_ddp.yaml"), "--num_processes",
               str(processes), "--main_process_port", str(free_port()), str(REPO / "tests/ppo_distributed_run.py"),
               str(out), *flags]
    proc = subprocess.run(command, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def assert_same(a: dict, b: dict, atol: float):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (gloo) path")
def test_ppo_two_processes_equal_one_process_with_the_double_batch(tmp_path):
    """2 processes x 4 prompts train the weights of 1 process x 8 prompts: disjoint prompt slices, advantages
    whitened over both processes, token means over both. Sampling is greedy (top_k 1) so the rollouts agree."""
    from ppo_distributed_run import parameters, run

    launch_ppo(tmp_path / "two", "--batch_size", "4", "--top_k", "1")
    one = run(tmp_path / "one", batch_size=8, top_k=1)
    two = torch.load(tmp_path / "two" / "parameters.pt", weights_only=True)
    start = run(tmp_path / "start", batch_size=8, top_k=1, max_steps=0)
    moved = max((v - parameters(start)[k]).abs().max().item() for k, v in two.items())
    assert moved > 1e-4  # training changed the weights
    assert_same(parameters(one), two, atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (gloo) path")
def test_ppo_two_processes_killed_and_resumed_equal_the_uninterrupted_run(tmp_path):
    """Rank 0 dies by SIGKILL in the middle of step 3; the rerun resumes both ranks from checkpoint-2 (weights,
    optimiser, schedule, each rank's sampling RNG) and ends with the weights and history of a run never stopped."""
    flags = ["--max_steps", "4", "--save_steps", "2"]
    launch_ppo(tmp_path / "straight", *flags)
    killed = launch_ppo(tmp_path / "killed", *flags, "--die_in_step", "3", check=False)
    assert killed.returncode != 0
    assert (tmp_path / "killed" / "checkpoint-2").is_dir() and not (tmp_path / "killed" / "checkpoint-4").exists()
    launch_ppo(tmp_path / "killed", *flags, "--resume")
    straight = torch.load(tmp_path / "straight" / "parameters.pt", weights_only=True)
    assert_same(straight, torch.load(tmp_path / "killed" / "parameters.pt", weights_only=True), atol=1e-6)
    history = [(tmp_path / run / "history.json").read_text() for run in ("straight", "killed")]
    assert history[0] == history[1]
