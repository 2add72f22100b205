"""One MPO training run from a recipe: what ``mpo train`` does.

Steps: load and check the preference pairs (any source :mod:`mpo.data` reads) -> load the policy and
processor -> freeze parts / add a LoRA adapter -> build :class:`mpo.trainer.MPOTrainer` ->
reference log-probs (``train.reference: precomputed``, the default: one no-grad pass before
training, cached in ``ref_logps.jsonl`` keyed by pair content and reference identity, so a rerun
reuses it and only one model is in memory; ``live``: a frozen copy, or with LoRA the
adapter-disabled model) -> train -> save.

Run folder (``run.output_dir``): ``config.yaml`` (resolved recipe), ``data_report.json`` (pairs
kept / truncated / skipped, with reasons; after training also ``padding``: the pair forward used and
the padding fraction of the micro-batches this process trained, from step ``from_step`` on),
``ref_logps.jsonl``, ``metrics.jsonl``,
``checkpoint-N/`` (Trainer's, plus ``mpo_delta.json``), and at the end ``policy/`` (full model +
processor; with LoRA the adapter merged in), ``adapter/`` (LoRA only) and ``mpo_state.json`` (final δ).

Parts for ``train.freeze`` (Qwen2.5-VL names): ``vision`` = ``model.visual`` without its merger,
``projector`` = ``model.visual.merger``, ``language`` = ``model.language_model`` and ``lm_head``.
With LoRA, frozen parts get no adapter; R1V2's adapter-only tuning is ``freeze: [vision, language]``
without LoRA (only the merger trains).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
from pathlib import Path

from mpo.config import ConfigError

WANDB_ENV = ("WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_GROUP")
PARTS = {
    "projector": ("model.visual.merger.",),
    "vision": ("model.visual.",),
    "language": ("model.language_model.", "lm_head."),
}
# Regexes (matched against full module names) for LoRA's exclude_modules.
_PART_PATTERNS = {
    "projector": r".*visual\.merger.*",
    "vision": r".*visual\.(?!merger).*",
    "language": r".*(language_model|lm_head).*",
}


def part_of(name: str) -> str | None:
    """Which freezable part a parameter name belongs to (the merger before the rest of visual)."""
    for part, prefixes in PARTS.items():
        if name.startswith(prefixes):
            return part
    return None


def freeze_parts(model, parts) -> int:
    """Set ``requires_grad=False`` on every parameter of the named parts; returns how many tensors."""
    frozen = 0
    for name, param in model.named_parameters():
        if part_of(name) in parts:
            param.requires_grad_(False)
            frozen += 1
    return frozen


def add_lora(model, lora, freeze):
    from peft import LoraConfig, get_peft_model

    exclude = "|".join(_PART_PATTERNS[p] for p in freeze) or None
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        exclude_modules=exclude,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def load_model(recipe, path, key: str = "model.policy"):
    import torch
    from transformers import AutoModelForImageTextToText

    from mpo.models import model_folder

    return AutoModelForImageTextToText.from_pretrained(
        model_folder(path, key),
        dtype=getattr(torch, recipe.model.dtype),
        attn_implementation=recipe.model.attn_implementation,
        trust_remote_code=recipe.model.trust_remote_code,
        use_safetensors=True,
    )


def load_policy(recipe):
    from mpo.models import model_folder, recipe_processor

    if not recipe.model.policy:
        raise ConfigError("model.policy: a policy folder or hub id is required for mpo train")
    folder = model_folder(recipe.model.policy, "model.policy")
    return load_model(recipe, folder), recipe_processor(folder, recipe.model)


def reference_fingerprint(recipe) -> str:
    """Identity of the reference log-probs: model files, dtype, attention, length policy, pixels."""
    folder = Path(recipe.train.reference_model or recipe.model.policy)
    files = []
    if folder.is_dir():
        for f in sorted(folder.glob("*.safetensors")) + [folder / "config.json"]:
            if f.is_file():
                stat = f.stat()
                files.append([f.name, stat.st_size, stat.st_mtime_ns])
    model, train = recipe.model, recipe.train
    identity = [
        str(folder.resolve()) if folder.exists() else str(folder),
        files,
        model.dtype,
        model.attn_implementation,
        model.min_pixels,
        model.max_pixels,
        train.max_length,
        train.on_too_long,
    ]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]


def checkpointing_arguments(enabled: bool) -> dict:
    """Activation checkpointing in ``TrainingArguments``: transformers 5.2x calls it
    ``activation_checkpointing`` (``gradient_checkpointing`` a deprecated alias); 5.19 knows only
    ``gradient_checkpointing``."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    prefix = "activation" if "activation_checkpointing" in names else "gradient"
    return {f"{prefix}_checkpointing": enabled, f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}}


def training_arguments(recipe, resume: bool):
    import torch
    from transformers import TrainingArguments

    t, run = recipe.train, recipe.run
    # bf16 autocast on CUDA; on CPU, Trainer refuses bf16 unless use_cpu, and the weights are bf16 anyway.
    autocast_bf16 = recipe.model.dtype == "bfloat16" and torch.cuda.is_available()
    return TrainingArguments(
        output_dir=run.output_dir,
        run_name=Path(run.output_dir).name,
        seed=run.seed,
        report_to=run.report_to,
        learning_rate=t.learning_rate,
        num_train_epochs=t.num_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        save_steps=t.save_steps,
        save_strategy="steps",
        logging_strategy="steps",
        bf16=autocast_bf16,
        **checkpointing_arguments(t.gradient_checkpointing),
        remove_unused_columns=False,
        disable_tqdm=True,
        dataloader_pin_memory=torch.cuda.is_available(),
        # A text-only micro-batch leaves the vision tower without gradients: DDP must allow unused parameters.
        ddp_find_unused_parameters=True,
    )


def build_trainer(recipe, pairs, wheres, model, processor, resume: bool = False, ref_cache=None):
    """Dataset, trainer and reference log-probs for ``pairs``; returns ``(trainer, dataset)``."""
    from mpo.batching import pair_lengths
    from mpo.chat import ChatEncoder
    from mpo.collate import PairCollator, PairDataset, pad_token_id
    from mpo.logprobs import attach_reference_logps
    from mpo.shared_prefix import choose_pair_forward
    from mpo.trainer import MPOTrainer, reference_context

    t = recipe.train
    dataset = PairDataset(pairs, ChatEncoder(processor), t.max_length, t.on_too_long, wheres)
    collator = PairCollator(pad_token_id(processor))
    if t.freeze:
        freeze_parts(model, t.freeze)
    # the reference: train.reference_model when set (e.g. pi_0 in later rounds), else the start policy
    separate = load_model(recipe, t.reference_model, "train.reference_model").eval() if t.reference_model else None
    live_copy = None
    if t.reference == "live":
        live_copy = separate if separate is not None else (copy.deepcopy(model).eval() if t.lora is None else None)
    if t.lora is not None:
        model = add_lora(model, t.lora, t.freeze)
    forward = choose_pair_forward(model, t.share_prompt)  # train.share_prompt, or why not
    print(f"pair forward: {forward.describe()}")
    lengths = pair_lengths(dataset)
    trainer = MPOTrainer(
        model=model,
        args=training_arguments(recipe, resume),
        train_dataset=dataset,
        data_collator=collator,
        processing_class=processor,
        loss=recipe.loss,
        ref_model=live_copy,
        pair_forward=forward,
        pair_lengths=lengths if t.group_by_length else None,
    )
    if t.reference == "precomputed":
        device = trainer.args.device
        model.to(device)
        cache = Path(ref_cache) if ref_cache else Path(recipe.run.output_dir) / "ref_logps.jsonl"
        reference = separate.to(device) if separate is not None else model
        with reference_context(reference):
            computed = attach_reference_logps(
                reference,
                dataset,
                collator,
                t.per_device_batch_size,
                cache,
                reference_fingerprint(recipe),
                device,
                forward if separate is None else choose_pair_forward(separate, t.share_prompt),
                lengths,
            )
        print(f"reference log-probs: {computed} computed, {len(dataset) - computed} reused from {cache}")
    return trainer, dataset


def save_outputs(trainer, processor, recipe) -> Path:
    """``policy/`` (+ ``adapter/`` with LoRA), processor and final δ, written by the main process."""
    from mpo.records import write_json
    from mpo.trainer import find_peft_model

    out = Path(recipe.run.output_dir)
    policy_dir = out / "policy"
    peft_model = find_peft_model(trainer.model)
    if peft_model is None:
        trainer.save_model(str(policy_dir))
    else:
        trainer.save_model(str(out / "adapter"))
        if trainer.is_world_process_zero():
            peft_model.merge_and_unload().save_pretrained(policy_dir)
    if trainer.is_world_process_zero():
        processor.save_pretrained(policy_dir)
        write_json(
            out / "mpo_state.json",
            {"delta": trainer.delta.state_dict(), "global_step": trainer.state.global_step},
        )
    return policy_dir


TRAIN_SETTINGS = ("loss", "train", "model.dtype", "model.attn_implementation", "model.min_pixels",
                  "model.max_pixels", "model.policy", "run.seed", "data.on_bad_image")
KEY_FILE = "run_key.json"


def training_key(recipe, pairs) -> dict:
    """What a training run's checkpoints and outputs are made of: the pairs' content, the policy and
    reference folders and every setting that changes the weights (logging and W&B may change)."""
    from mpo.models import folder_identity
    from mpo.stages import records_digest

    dump = recipe.model_dump(mode="json")
    key = {"pairs": records_digest(pairs), "policy files": folder_identity(recipe.model.policy or ""),
           "reference files": folder_identity(recipe.train.reference_model or recipe.model.policy or "")}
    for name in TRAIN_SETTINGS:
        section, _, field = name.partition(".")
        values = {field: dump[section][field]} if field else dump[section]
        key.update({f"{section}.{k}": v for k, v in values.items() if k not in ("save_steps",)})
    return key


def trim_metrics(path: Path, step: int) -> None:
    """Keep the metrics rows of steps up to ``step`` (a resumed checkpoint's); a line cut short by a
    kill is dropped. ``step`` 0 empties the file."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("step", step + 1) <= step:
            kept.append(line + "\n")
    from mpo.records import atomic_write_text

    atomic_write_text(path, kept)


def run_training(recipe, resume: bool = False, ref_cache=None, quiet: bool = False, key: dict | None = None) -> Path:
    """``mpo train``: train on ``recipe.data.preferences``; returns the saved policy folder.

    The run folder is locked while it trains. Its ``run_key.json`` says what it was made of
    (:func:`training_key`, or ``key`` from ``mpo iterate``): a finished run with the same key is not
    trained again (nothing is written), ``resume`` refuses checkpoints made with another key, and a
    fresh start removes the checkpoints of the run it replaces. ``quiet`` (``mpo iterate``) leaves
    out the per-step log lines; they still land in ``metrics.jsonl``."""
    from mpo.run_lock import run_lock

    if not recipe.data.preferences:
        raise ConfigError(
            "data.preferences: a preference set (jsonl, MMPR meta.json, parquet, dataset folder) is required"
        )
    out = Path(recipe.run.output_dir)
    with run_lock(out):
        return _train_locked(recipe, out, resume, ref_cache, quiet, key)


def _train_locked(recipe, out: Path, resume: bool, ref_cache, quiet: bool, key: dict | None) -> Path:
    import shutil

    from mpo.config import save_resolved
    from mpo.data import load_preferences
    from mpo.errors import writing_into
    from mpo.records import write_json
    from mpo.stages import check_key, last_complete_checkpoint

    loaded = load_preferences(recipe.data.preferences, image_root=recipe.data.image_root,
                              on_bad_image=recipe.data.on_bad_image, image_cache=out / "image_cache")
    key = key if key is not None else training_key(recipe, loaded.records)
    key_file = out / KEY_FILE
    finished = (out / "mpo_state.json").is_file() and (out / "policy" / "config.json").is_file()
    if finished and key_file.is_file() and json.loads(key_file.read_text(encoding="utf-8")) == json.loads(
            json.dumps(key, default=str)):
        print(f"{out}: trained earlier with the same data and settings; nothing to do (policy: {out / 'policy'})")
        return out / "policy"
    if resume:
        check_key(out, key, str(out), key_file=key_file)
    else:
        stale = sorted(out.glob("checkpoint-*")) if out.is_dir() else []
        for folder in stale:
            shutil.rmtree(folder)
        if stale:
            print(f"{out}: starting afresh; removed {len(stale)} checkpoint(s) of the earlier run")
        (out / "mpo_state.json").unlink(missing_ok=True)
        write_json(key_file, json.loads(json.dumps(key, default=str)))
    print(f"resolved recipe: {save_resolved(recipe, out)}")
    model, processor = load_policy(recipe)
    trainer, dataset = build_trainer(recipe, loaded.records, loaded.sources, model, processor, resume, ref_cache)
    report = dataset.report
    data_report = {**report.__dict__, "bad_images_skipped": loaded.skipped}
    write_json(out / "data_report.json", data_report)
    print(f"data: {report.summary()}; {len(loaded.skipped)} skipped for bad images")
    checkpoint = last_complete_checkpoint(out) if resume else None
    if resume:
        print(f"resuming from {checkpoint}" if checkpoint else f"no complete checkpoint in {out}: starting afresh")
    from_step = int(checkpoint.rsplit("-", 1)[1]) if checkpoint else 0
    if trainer.is_world_process_zero():
        trim_metrics(out / "metrics.jsonl", from_step)
    if quiet:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    with writing_into(out, "training"), wandb_environment(recipe.run):
        trainer.train(resume_from_checkpoint=checkpoint)
        policy_dir = save_outputs(trainer, processor, recipe)
        # the padding of this run's training micro-batches (mpo.batching), once they have run
        padding = {**trainer.padding_report(), "from_step": from_step}
        write_json(out / "data_report.json", {**data_report, "padding": padding})
    print(f"policy saved to {policy_dir}")
    return policy_dir


@contextlib.contextmanager
def wandb_environment(run):
    """W&B settings for transformers' callback (project, folder, group from the recipe, where the
    environment does not already set them), restored afterwards; the run the trainer opens is
    closed and wandb's per-process settings torn down, so several trainings in one process (rounds,
    sweep points) each log where their recipe says. A run already open (``mpo iterate``'s) is left
    open and receives the trainer's metrics."""
    if run.report_to != "wandb":
        yield
        return
    import wandb

    saved = {key: os.environ.get(key) for key in WANDB_ENV}
    os.environ.setdefault("WANDB_PROJECT", run.wandb_project)
    os.environ.setdefault("WANDB_DIR", str(Path(run.output_dir).resolve()))
    if run.wandb_group:
        os.environ.setdefault("WANDB_RUN_GROUP", run.wandb_group)
    owns_run = wandb.run is None
    try:
        yield
    finally:
        if owns_run:
            wandb.finish()
            wandb.teardown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
