"""benchmarks/ppo_vs_trl.py without TRL 1.12: its extra arms of ours parse into PPOConfig settings, a malformed or
unknown `--variant` stops before any training, and the summary's spread and ratios are computed right."""

import importlib.util
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))  # the script imports its sibling ppo_speed
spec = importlib.util.spec_from_file_location("ppo_vs_trl", REPO / "benchmarks" / "ppo_vs_trl.py")
ppo_vs_trl = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ppo_vs_trl)


def test_variant_settings_read_python_literals_and_strings():
    settings = ppo_vs_trl.variant_settings("max_grad_norm=0,lr_scheduler_type=constant,missing_eos_penalty=None")
    assert settings == {"max_grad_norm": 0, "lr_scheduler_type": "constant", "missing_eos_penalty": None}

    from pipeline.alignment.ppo_trainer import PPOConfig

    assert PPOConfig(**settings).max_grad_norm == 0


@pytest.mark.parametrize("variant", ["max_grad_norm", "no_such_key=1", "max_grad_norm=0,cliprange"])
def test_a_bad_variant_stops_before_training(variant, capsys):
    with pytest.raises(SystemExit) as stopped:
        ppo_vs_trl.main(["--trl_path", "/nonexistent", "--variant", variant])
    assert stopped.value.code == 2
    assert f"got {variant!r}" in capsys.readouterr().err


def test_spread_is_mean_sample_std_and_standard_error():
    assert ppo_vs_trl.spread([1.0, 2.0, 3.0, 4.0]) == {"mean": 2.5, "std": 1.291, "sem": 0.645}
    assert ppo_vs_trl.spread([0.7]) == {"mean": 0.7, "std": 0.0, "sem": 0.0}
