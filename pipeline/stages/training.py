"""What every training stage shares: dataset resolution, safe defaults on CPU, guards and time limits."""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from pipeline.artifacts import MANIFEST_NAME, build_manifest, env_versions, file_sha256, latest_checkpoint
from pipeline.data.mixing import Mixture, load_mixture
from pipeline.data.prepare import Prepared, find_prepared, prepare_once
from pipeline.errors import ConfigError, UserError


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
        raise ConfigError("dataset: no sources; set dataset.sources in the YAML or pass --dataset_path PATH")
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


def prepared_data(args, tokenizer, output_dir: str, *, reuse_only: bool = False
                  ) -> Prepared | None:
    """A pretraining stage's data (`args`: its arguments, with block_size, prepared_dir, shard_blocks and
    tokenizer_name_or_path) prepared once (rank 0 prepares, the others wait), or with `reuse_only` the existing
    preparation if there is one."""
    spec = mixture_spec(args, default_test_size=0.02)
    root = Path(args.prepared_dir) if args.prepared_dir else Path(output_dir).parent / "prepared"
    options = dict(block_size=args.block_size, root=root, shard_blocks=args.shard_blocks)
    if reuse_only:
        return find_prepared(spec, tokenizer, **options)
    return prepare_once(spec, tokenizer, tokenizer_path=args.tokenizer_name_or_path, **options)


def on_cpu_only(training) -> None:
    """TRL 1.16 configs default to bf16=True, which fails without a GPU: fall back to float32 and say so."""
    if not torch.cuda.is_available() and getattr(training, "bf16", False):
        print("bf16: no GPU here, training in float32 instead")
        training.bf16 = False


class NonFiniteLossError(UserError, RuntimeError):
    """The loss diverged: the message says how to go on (a lower learning rate, a resume)."""


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


def rows_dropped_by_trainer(trainer, train_rows: list, eval_rows: list, max_length: int | None) -> dict:
    """Rows TRL's dataset preparation removed (pairs longer than max_length, rows with no trained token), counted
    and said; an error when nothing is left to train on."""
    counts = {}
    for split, rows, prepared in (("train", train_rows, trainer.train_dataset),
                                  ("eval", eval_rows, trainer.eval_dataset)):
        if rows and prepared is not None and len(prepared) < len(rows):
            counts[split] = len(rows) - len(prepared)
            print(f"{split}: {counts[split]} of {len(rows)} rows dropped in preparation (longer than "
                  f"max_length={max_length} tokens, or nothing to train on)")
    if train_rows and trainer.train_dataset is not None and len(trainer.train_dataset) == 0:
        raise ConfigError(f"max_length: all {len(train_rows)} training rows are longer than max_length={max_length} "
                         f"tokens; raise max_length")
    return {f"rows_dropped_{k}": v for k, v in counts.items()}


# Keys that steer a run without changing what it learns: a resume may change them (e.g. a larger max_steps).
RUN_CONTROL_KEYS = {"output_dir", "overwrite", "max_steps", "max_seconds", "resume_from_checkpoint", "eval_demo_tasks",
                    "report_to", "run_name", "disable_tqdm", "dataloader_num_workers", "dataloader_persistent_workers",
                    "ddp_timeout", "push_to_hub", "do_eval", "torch_empty_cache_steps", "cpu_threads"}
RUN_CONTROL_PREFIXES = ("save_", "logging_", "log_", "eval_", "hub_", "per_device_eval_")


def run_fingerprint(config: dict, parents: list[str | None], mixture) -> dict:
    """What decides the weights a run produces: the resolved config without run-control keys (flattened to
    "section.key"), the parents' manifest hashes, the data fingerprint, package versions."""
    flat = {f"{section}.{key}": value for section, values in config.items() for key, value in values.items()
            if key not in RUN_CONTROL_KEYS and not key.startswith(RUN_CONTROL_PREFIXES)}
    for i, parent in enumerate(p for p in parents if p):
        manifest = Path(parent) / MANIFEST_NAME
        flat[f"parent.{i}"] = f"{parent}@{file_sha256(manifest)[:16]}" if manifest.is_file() else str(parent)
    flat["data"] = mixture.fingerprint()
    flat.update({f"version.{name}": version for name, version in env_versions().items()})
    return flat


def train_resuming(trainer, out, training, *, args, parents: list[str | None], mixture):
    """`trainer.train()`, resuming from --resume_from_checkpoint or the latest complete checkpoint of this output,
    once `out.guard_resume` has checked that the interrupted run trained with the same settings, parents and data."""
    out.guard_resume(run_fingerprint({"stage": asdict(args), "training": training.to_dict()}, parents, mixture))
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
    if model is None:
        fsdp = getattr(trainer.accelerator.state, "fsdp_plugin", None)
        if fsdp is not None:  # checkpoints may be sharded per rank; the output is one full model
            fsdp.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model(str(out.work))  # every rank: FSDP and DeepSpeed gather the weights collectively
    if trainer.is_world_process_zero():
        write_stage_output(out, stage, model=model, tokenizer=tokenizer, artifact=artifact, config=config,
                           parent=parent, datasets=dataset_records(mixture, data), metrics=metrics)
    trainer.accelerator.wait_for_everyone()


def write_stage_output(out, stage: str, *, model, tokenizer, artifact: str, config: dict, parent: str | None,
                       datasets: list[dict], metrics: dict) -> None:
    """Main process only: drop the merged parent copy, save `model` (unless already saved: None) and the tokenizer
    into the work folder, then write the manifest and move the folder into place."""
    shutil.rmtree(out.work / "initial-weights", ignore_errors=True)
    if model is not None:
        model.save_pretrained(out.work)
    tokenizer.save_pretrained(out.work)
    out.finish(build_manifest(stage, artifact=artifact, config=config, parent_dir=parent, base_model=parent,
                              tokenizer=tokenizer, datasets=datasets, metrics=metrics))
