"""What the MPO trainer (:mod:`mpo.train.trainer`) and the reward-model trainer (:mod:`reward.trainer`)
set up the same way on ``transformers.Trainer``.

- **Parts** for ``train.freeze`` / ``reward_train.freeze``: ``vision`` = the vision tower without its
  merger, ``projector`` = what maps its features into the language model (``visual.merger``,
  Qwen3-VL's deepstack mergers, ``multi_modal_projector``), ``language`` = the language model and its
  LM head; one table for every family (:data:`PART_PATTERNS`). :func:`freeze_parts` freezes them and counts the tensors of each; a part that matches no
  parameter is an error. :func:`lora_exclude` is the one rule that keeps LoRA adapters out of frozen
  parts, for both trainers.
- **Activation checkpointing**: :func:`checkpointing_arguments` (the ``TrainingArguments`` keys; 5.2x
  names them ``activation_checkpointing``, 5.19 ``gradient_checkpointing``) and
  :func:`enable_checkpointing` (for a model the Trainer cannot switch itself, the reward wrapper).
- :func:`base_arguments`: the ``TrainingArguments`` both build (schedule, precision, logging, saving).
- :class:`MetricsFile`: every training log appended to ``metrics.jsonl`` on the main process, and
  :func:`trim_metrics`, which cuts it back to a resumed checkpoint's step.
- :class:`StopOnSignal`: a preemption signal (:mod:`mpo.preempt`) ends training at the step it came
  in, with a checkpoint of that step.
- :func:`wandb_scope`: the recipe's W&B settings for the duration of one training, restored after.

Imported by the training code only (it imports transformers).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

from transformers import TrainerCallback

from mpo.errors import MpoError

# Part -> regex on a parameter (or module) name, matched at a name boundary, for every family: the
# Qwen family and GLM-4.1V keep vision tower and merger under ``model.visual`` (Qwen3-VL adds its
# deepstack mergers, which project features into the language model: projector); InternVL, LLaVA and
# Gemma 3 have ``model.vision_tower`` and ``model.multi_modal_projector``. The projector is matched
# before the rest of the vision tower.
PART_PATTERNS = {
    "projector": r"(visual\.(merger|deepstack_merger)|multi_modal_projector)",
    "vision": r"(visual\.(?!merger|deepstack_merger)|vision_tower)",
    "language": r"(language_model|lm_head)",
}
WANDB_ENV = ("WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_GROUP")


def part_of(name: str) -> str | None:
    """Which freezable part a parameter name belongs to."""
    for part, pattern in PART_PATTERNS.items():
        if re.search(rf"(^|\.){pattern}", name):
            return part
    return None


def freeze_parts(model, parts) -> dict[str, int]:
    """Set ``requires_grad=False`` on every parameter of the named parts; returns the tensors frozen
    per part (printed by the callers). A part that names no parameter of this model is an error."""
    counts = dict.fromkeys(parts, 0)
    for name, param in model.named_parameters():
        part = part_of(name)
        if part in counts:
            param.requires_grad_(False)
            counts[part] += 1
    empty = [part for part, count in counts.items() if count == 0]
    if empty:
        raise MpoError(f"freeze: {', '.join(empty)}: no parameter of {type(model).__name__} belongs to this part")
    return counts


def frozen_summary(counts: dict[str, int]) -> str:
    """:func:`freeze_parts`' counts as the line both trainers print: ``vision (390 tensors), ...``."""
    return ", ".join(f"{part} ({n} tensors)" for part, n in counts.items())


def lora_exclude(freeze) -> str | None:
    """LoRA's ``exclude_modules`` (a full-match regex on module names) for the frozen parts."""
    return "|".join(rf"(.*\.)?{PART_PATTERNS[part]}.*" for part in freeze) or None


def add_lora(model, lora, freeze, task_type: str | None = "CAUSAL_LM"):
    """A LoRA adapter on every targeted module outside the frozen parts; returns the ``PeftModel``."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, exclude_modules=lora_exclude(freeze),
                        task_type=task_type)
    return get_peft_model(model, config)


def checkpointing_arguments(enabled: bool) -> dict:
    """Activation checkpointing in ``TrainingArguments``: transformers 5.2x calls it
    ``activation_checkpointing`` (``gradient_checkpointing`` a deprecated alias); 5.19 knows only
    ``gradient_checkpointing``."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    prefix = "activation" if "activation_checkpointing" in names else "gradient"
    return {f"{prefix}_checkpointing": enabled, f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}}


def enable_checkpointing(model) -> None:
    """Turn activation checkpointing on in a model the Trainer does not switch itself."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def base_arguments(run, output_dir, run_name: str, dtype: str, arguments=None, **settings):
    """``TrainingArguments`` (or its subclass ``arguments``: the GRPO run's ``GRPOConfig``) with what
    every trainer shares; ``settings`` (schedule, batch, saving) are the trainer's own. Autocast (bf16 /
    fp16) only where CUDA runs it: on a CPU the Trainer refuses it, and the weights train in their own
    dtype there. The Trainer's progress bar (on stderr) shows where stderr is a terminal."""
    import sys

    import torch
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    return (arguments or TrainingArguments)(
        output_dir=str(output_dir),
        run_name=run_name,
        seed=run.seed,
        report_to=["wandb"] if run.report_to == "wandb" else [],
        bf16=dtype == "bfloat16" and cuda,
        fp16=dtype == "float16" and cuda,
        logging_strategy="steps",
        remove_unused_columns=False,
        dataloader_pin_memory=cuda,
        disable_tqdm=not sys.stderr.isatty(),
        **settings,
    )


METRICS_FILE = "metrics.jsonl"  # a training run's logs, in its output folder (MetricsFile)


class MetricsFile(TrainerCallback):
    """Appends every training log to a JSONL file on the main process (``step`` first); see
    :func:`trim_metrics` for resume. ``only_training_steps`` (the reward trainer's file) leaves out
    the Trainer's end-of-training summary row, which has no ``loss``."""

    def __init__(self, path: Path, only_training_steps: bool = False):
        self.path = Path(path)
        self.only_training_steps = only_training_steps

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.only_training_steps and "loss" not in (logs or {}):
            return
        if state.is_world_process_zero and logs:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": state.global_step, **logs}) + "\n")


class StopOnSignal(TrainerCallback):
    """After a preemption signal (:func:`mpo.preempt.received`; every rank asks all the others, so
    they stop at the same step), save a checkpoint at the end of the step and stop; ``stopped_at``
    is that step."""

    def __init__(self):
        self.stopped_at = None

    def on_step_end(self, args, state, control, **kwargs):
        from mpo.preempt import received

        if _any_rank(received() is not None):
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control


def _any_rank(flag: bool) -> bool:
    import torch

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    backend = torch.distributed.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def start_afresh(out: Path, key: dict, also: tuple[str, ...] = ()) -> None:
    """A run folder cleared of an earlier run's checkpoints (said in one line), its finished marker and
    the files ``also`` names, then ``key`` written: what a training run does when it does not resume."""
    import shutil

    from mpo.keys import KEY_FILE, TRAINED_FILE, write_key

    stale = sorted(out.glob("checkpoint-*")) if out.is_dir() else []
    for folder in stale:
        shutil.rmtree(folder)
    if stale:
        print(f"{out}: starting afresh; removed {len(stale)} checkpoint(s) of the earlier run")
    for name in (TRAINED_FILE, *also):
        (out / name).unlink(missing_ok=True)
    write_key(out / KEY_FILE, key)


def read_metrics(path: Path) -> list[dict]:
    """The rows of a ``metrics.jsonl`` (:class:`MetricsFile`'s); none where the file is missing."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def metric_means(rows: list[dict], keys) -> dict[str, float]:
    """Each of ``keys`` -> the mean of its numeric values over ``rows`` (keys no row has a number for
    are left out)."""
    means = {}
    for key in keys:
        values = [row[key] for row in rows if isinstance(row.get(key), (int, float))]
        if values:
            means[key] = sum(values) / len(values)
    return means


def trim_metrics(path: Path, step: int) -> None:
    """Keep the metrics rows of steps up to ``step`` (a resumed checkpoint's); a line cut short by a
    kill is dropped, and so is an end-of-training row (``train_runtime``), which the resumed
    training writes again. ``step`` 0 empties the file."""
    from mpo.records import atomic_write_text

    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("step", step + 1) <= step and "train_runtime" not in row:
            kept.append(line + "\n")
    atomic_write_text(path, kept)


@contextlib.contextmanager
def wandb_scope(run, folder: str | os.PathLike, default_group: str | None = None):
    """W&B settings for transformers' callback (project, ``folder``, group from the recipe, where the
    environment does not already set them), restored afterwards; the run the trainer opens is
    closed and wandb's per-process settings torn down, so several trainings in one process (rounds,
    sweep points, reward stages) each log where their recipe says. A run already open (``mpo
    iterate``'s) is left open and receives the trainer's metrics."""
    if run.report_to != "wandb":
        yield
        return
    import wandb

    saved = {key: os.environ.get(key) for key in WANDB_ENV}
    os.environ.setdefault("WANDB_PROJECT", run.wandb_project)
    os.environ.setdefault("WANDB_DIR", str(Path(folder).resolve()))
    if run.wandb_group or default_group:
        os.environ.setdefault("WANDB_RUN_GROUP", run.wandb_group or default_group)
    owns_run = wandb.run is None
    try:
        yield
    finally:
        if owns_run and wandb.run is not None:
            wandb.finish()
        if owns_run:
            wandb.teardown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def hide_log_dicts(trainer) -> None:
    """No per-step log dict printed (transformers' ``PrinterCallback``, where its progress bar is off):
    ``metrics.jsonl``, the progress bar and a summary line say it inside the toolkit's own stages."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
