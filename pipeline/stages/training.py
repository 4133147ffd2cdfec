"""What every training stage shares: dataset resolution, safe defaults on CPU, guards and time limits."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainerCallback

from pipeline.data.mixing import Mixture, load_mixture


@dataclass
class DataArguments:
    """The `dataset` block of a stage config, or one source given on the command line."""

    dataset: dict = field(default_factory=dict, metadata={
        "help": "mixture spec: {sources: [{path, fraction|rows, format, fields}], seed, test_size, dedup, clean}"})
    dataset_path: str | None = field(default=None, metadata={
        "help": "one source (file, folder, Hub id or demo:KIND?n=N) replacing dataset.sources"})
    dataset_format: str | None = field(default=None, metadata={"help": "force the input format of dataset_path"})


def mixture_spec(data: DataArguments, *, default_test_size: float | int = 0) -> dict[str, Any]:
    """The `dataset` block with `--dataset_path` applied: what `load_mixture` and `prepare` read."""
    spec: dict[str, Any] = dict(data.dataset)
    if data.dataset_path:
        source = {"path": data.dataset_path}
        if data.dataset_format:
            source["format"] = data.dataset_format
        spec["sources"] = [source]
    if not spec.get("sources"):
        raise ValueError("dataset: no sources; set dataset.sources in the YAML or pass --dataset_path PATH")
    spec.setdefault("test_size", default_test_size)
    return spec


def resolve_mixture(data: DataArguments, *, default_test_size: float | int = 0) -> Mixture:
    mixture = load_mixture(mixture_spec(data, default_test_size=default_test_size))
    print(mixture.summary())
    return mixture


def dataset_records(mixture: Mixture, data: DataArguments) -> list[dict]:
    """Manifest entries for the data a stage trained on (licences come from the mixture sources, when given)."""
    sources = [{"path": data.dataset_path}] if data.dataset_path else list(data.dataset.get("sources", []))
    def licence(source: dict) -> str | None:  # the embedded demo data ships under the project's licence
        return source.get("license") or ("apache-2.0" if str(source["path"]).startswith("demo:") else None)

    return [{"name": str(s["path"]), "license": licence(s), "rows": mixture.sampled.get(str(s["path"])),
             "fingerprint": mixture.fingerprint()} for s in sources]


def on_cpu_only(training) -> None:
    """TRL 1.16 configs default to bf16=True, which fails without a GPU: fall back to float32 and say so."""
    if not torch.cuda.is_available() and getattr(training, "bf16", False):
        print("bf16: no GPU here, training in float32 instead")
        training.bf16 = False


class NonFiniteLossError(RuntimeError):
    pass


class StopOnNonFiniteLoss(TrainerCallback):
    """Stops at the first NaN/inf logged loss. The last saved checkpoint is left untouched for a resume."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise NonFiniteLossError(
                f"loss became {loss} at step {state.global_step}: training stopped. The last good checkpoint in "
                f"{args.output_dir} is kept; lower the learning rate or check the data, then resume with "
                f"--resume_from_checkpoint true")


class TimeLimit(TrainerCallback):
    """Saves and stops once `max_seconds` have passed, so an outer timeout never kills a run before it saves."""

    def __init__(self, max_seconds: float | None):
        self.max_seconds = max_seconds
        self.start = time.monotonic()
        self.hit = False

    def on_step_end(self, args, state, control, **kwargs):
        if self.max_seconds and time.monotonic() - self.start > self.max_seconds:
            self.hit = True
            control.should_save = True
            control.should_training_stop = True
        return control


class LossHistory(TrainerCallback):
    """Keeps (step, loss) pairs for the stage report's loss curves."""

    def __init__(self):
        self.points: list[tuple[int, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.points.append((state.global_step, float(logs["loss"])))


def guards(max_seconds: float | None) -> tuple[list, "TimeLimit", "LossHistory"]:
    """The callbacks every stage trains with: stop on NaN/inf, time limit that saves first, loss history."""
    limit, history = TimeLimit(max_seconds), LossHistory()
    return [StopOnNonFiniteLoss(), limit, history], limit, history


def train_resuming(trainer, out, training):
    """`trainer.train()`, resuming from --resume_from_checkpoint or the latest complete checkpoint of this output."""
    from pipeline.stages.common import latest_checkpoint

    resume = training.resume_from_checkpoint
    if resume in (True, "true", "True"):
        resume = None  # "true" means: the latest checkpoint, which is what an unset value picks anyway
    latest = latest_checkpoint(out.checkpoints_dir)
    if resume is None and latest:
        print(f"resuming from {latest}")
    return trainer.train(resume_from_checkpoint=resume or latest)


def finish_stage(trainer, out, stage: str, *, tokenizer, artifact: str, config: dict, parent: str | None,
                 mixture, data: DataArguments, metrics: dict, model=None) -> None:
    """Save the model (`model`, or the trainer's) and tokenizer into the work folder, then write the manifest and
    move the folder into place; on the main process only, the others wait."""
    import shutil

    from pipeline.hub.manifest import build_manifest

    if model is None:
        trainer.save_model(str(out.work))  # every rank: FSDP and DeepSpeed gather the weights collectively
    if trainer.is_world_process_zero():
        shutil.rmtree(out.work / "initial-weights", ignore_errors=True)
        if model is not None:
            model.save_pretrained(out.work)
        tokenizer.save_pretrained(out.work)
        out.finish(build_manifest(stage, artifact=artifact, config=config, parent_dir=parent, base_model=parent,
                                  tokenizer=tokenizer, datasets=dataset_records(mixture, data), metrics=metrics))
    trainer.accelerator.wait_for_everyone()
