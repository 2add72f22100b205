"""One MPO training run from a recipe: what ``mpo train`` does.

Steps (:func:`run_training`): load and check the preference pairs (any source :mod:`mpo.data`
reads) -> load the policy and processor -> :func:`build_trainer` (freeze parts / add a LoRA adapter,
:class:`mpo.train.trainer.MPOTrainer`) -> :func:`precompute_reference` (``train.reference_logps: precomputed``,
the default: one no-grad pass before training, cached in ``ref_logps.jsonl`` keyed by pair content
and reference identity, so a rerun reuses it and only one model is in memory; ``live``: a frozen
copy, or with LoRA the adapter-disabled model, nothing to precompute) -> train -> save.

Run folder (``run.output_dir``): ``config.yaml`` (resolved recipe), ``data_report.json`` (pairs
kept / truncated / skipped, with reasons; after training also ``padding``: the pair forward used and
the padding fraction of the micro-batches this process trained, from step ``from_step`` on),
``ref_logps.jsonl``, ``metrics.jsonl``,
``checkpoint-N/`` (Trainer's; δ inside its ``trainer_state.json``), and at the end ``policy/`` (full model +
processor; with LoRA the adapter merged in), ``adapter/`` (LoRA only) and ``mpo_state.json`` (final δ).

Parts for ``train.freeze``: see :mod:`mpo.train.setup`. With LoRA, frozen parts get no adapter;
R1V2's adapter-only tuning is ``freeze: [vision, language]`` without LoRA (only the merger trains).
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

from mpo.config import ConfigError

REF_LOGPS_FILE = "ref_logps.jsonl"  # the reference log-probs, computed once (train.reference_logps: precomputed)


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


def _load_pairs(recipe, out: Path, rounds: bool):
    """``data.preferences`` as :func:`mpo.data.load_preferences` reads them. With
    ``data.special_tokens=error`` the first pair holding a control token's text is refused, with only
    the policy's processor loaded (not in a round: its prompts were checked when loaded, and its
    responses, generated, are tokenized as plain text)."""
    from mpo import control_tokens as control
    from mpo.data import load_preferences
    from mpo.models import model_folder, recipe_processor

    loaded = load_preferences(recipe.data.preferences, image_root=recipe.data.image_root,
                              on_bad_image=recipe.data.on_bad_image, image_cache=out / "image_cache",
                              split=recipe.data.split)
    if recipe.data.special_tokens == "error" and recipe.model.policy and not rounds:
        processor = recipe_processor(model_folder(recipe.model.policy, "model.policy"), recipe.model)
        control.check_pairs(control.literals(processor), loaded.records, loaded.sources)
    return loaded


def load_policy(recipe):
    from mpo.models import model_folder, recipe_processor

    if not recipe.model.policy:
        raise ConfigError("model.policy: a policy folder or hub id is required for mpo train")
    folder = model_folder(recipe.model.policy, "model.policy")
    return load_model(recipe, folder), recipe_processor(folder, recipe.model)


def reference_fingerprint(recipe) -> str:
    """Identity of the reference log-probs: the reference model's files by content
    (:func:`mpo.models.folder_identity`) and :data:`mpo.keys.REF_LOGPS_SETTINGS` (dtype, attention,
    pixels, length policy)."""
    from mpo.keys import REF_LOGPS_SETTINGS, digest, settings
    from mpo.models import folder_identity

    reference = folder_identity(recipe.train.reference_model or recipe.model.policy or "")
    return digest([reference, *settings(recipe, REF_LOGPS_SETTINGS).values()])


def training_arguments(recipe, resume: bool = False):
    from mpo.train.setup import base_arguments, checkpointing_arguments

    t, run = recipe.train, recipe.run
    return base_arguments(
        run, run.output_dir, Path(run.output_dir).name, recipe.model.dtype,
        learning_rate=t.learning_rate, num_train_epochs=t.num_epochs, max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_batch_size, gradient_accumulation_steps=t.gradient_accumulation_steps,
        lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio of the steps
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, logging_steps=t.logging_steps,
        save_steps=t.save_steps, save_strategy="steps",
        **checkpointing_arguments(t.gradient_checkpointing),
        # A text-only micro-batch leaves the vision tower without gradients: DDP must allow unused parameters.
        ddp_find_unused_parameters=True,
    )


def build_trainer(recipe, pairs, wheres, model, processor, resume: bool = False):
    """Dataset and trainer for ``pairs`` (parts frozen, LoRA added, a live reference where the recipe
    asks for one, the pair forward: prompt-shared or not, ``train.share_prompt``); returns
    ``(trainer, dataset)``. The precomputed reference is :func:`precompute_reference`'s."""
    from mpo.chat import ChatEncoder
    from mpo.models import eos_list
    from mpo.train.batching import pair_lengths
    from mpo.train.collate import PairCollator, PairDataset, pad_token_id
    from mpo.train.setup import add_lora, freeze_parts, frozen_summary
    from mpo.train.shared_prefix import choose_pair_forward
    from mpo.train.trainer import MPOTrainer

    t = recipe.train
    stops = eos_list(getattr(model.generation_config, "eos_token_id", None))
    dataset = PairDataset(pairs, ChatEncoder(processor, stops), t.max_length, t.on_too_long, wheres)
    if t.freeze:
        counts = freeze_parts(model, t.freeze)
        print(f"frozen: {frozen_summary(counts)}")
    live_copy = None
    if t.reference_logps == "live":  # train.reference_model when set (pi_0 in later rounds), else the start policy
        if t.reference_model:
            live_copy = load_model(recipe, t.reference_model, "train.reference_model").eval()
        elif t.lora is None:
            live_copy = copy.deepcopy(model).eval()
    if t.lora is not None:
        model = add_lora(model, t.lora, t.freeze)
    forward = choose_pair_forward(model, t.share_prompt)  # train.share_prompt, or why not
    print(f"pair forward: {forward.describe()}")
    lengths = pair_lengths(dataset)
    trainer = MPOTrainer(model=model, args=training_arguments(recipe, resume), train_dataset=dataset,
                         data_collator=PairCollator(pad_token_id(processor)), processing_class=processor,
                         loss=recipe.loss, ref_model=live_copy, pair_forward=forward,
                         pair_lengths=lengths if t.group_by_length else None)
    return trainer, dataset


def precompute_reference(trainer, dataset, recipe, ref_cache=None) -> int:
    """``train.reference_logps: precomputed``: the reference's log-probs of every pair, in one no-grad pass
    (cached by pair content and the reference's identity, so only what is missing is computed), carried
    in the dataset's items. The reference is ``train.reference_model`` where set, else the policy with
    any adapter disabled. Returns how many were computed."""
    from mpo.train.batching import pair_lengths
    from mpo.train.logprobs import attach_reference_logps
    from mpo.train.shared_prefix import choose_pair_forward
    from mpo.train.trainer import reference_context

    t = recipe.train
    if t.reference_logps != "precomputed":
        return 0
    device = trainer.args.device
    model = trainer.model.to(device)
    cache = Path(ref_cache) if ref_cache else Path(recipe.run.output_dir) / REF_LOGPS_FILE
    forward = trainer.pair_forward  # the same prompt-shared (or not) forward as training
    reference = model
    if t.reference_model:
        reference = load_model(recipe, t.reference_model, "train.reference_model").eval().to(device)
        forward = choose_pair_forward(reference, t.share_prompt)
    with reference_context(reference):
        computed = attach_reference_logps(reference, dataset, trainer.data_collator, t.per_device_batch_size,
                                          cache, reference_fingerprint(recipe), device, forward,
                                          pair_lengths(dataset))
    print(f"reference log-probs: {computed} computed, {len(dataset) - computed} reused from {cache}")
    return computed


def save_outputs(trainer, processor, recipe) -> Path:
    """``policy/`` (+ ``adapter/`` with LoRA), processor and :data:`mpo.keys.TRAINED_FILE` (the final
    step, and δ where the trainer has one: not ``mpo grpo``'s), written by the main process."""
    from mpo.keys import TRAINED_FILE
    from mpo.records import write_json
    from mpo.train.trainer import find_peft_model

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
        delta = {"delta": trainer.delta.state_dict()} if hasattr(trainer, "delta") else {}
        write_json(out / TRAINED_FILE, {**delta, "global_step": trainer.state.global_step})
    return policy_dir


def train_settings(recipe, form: str = "today", extra: tuple[str, ...] = ()) -> dict:
    """:data:`mpo.keys.TRAIN_SETTINGS` (and ``extra``) of ``recipe`` as training keys hold them
    (:func:`mpo.keys.settings`), ``train.reference_model`` by content: what ``mpo train``'s key and a
    round's training key (:meth:`mpo.rounds.layout.RoundLayout.train_key`) are made of beside their
    inputs. ``form``: ``"earlier"``, as keys held them before logging settings were left out (every
    setting); ``"legacy"``, as the earlier key format held them (that, and model references by path)."""
    from mpo.keys import TRAIN_SETTINGS, settings
    from mpo.models import folder_identity

    out = settings(recipe, (*TRAIN_SETTINGS, *extra), every=form != "today")
    if form != "legacy" and out.get("train.reference_model"):
        out["train.reference_model"] = folder_identity(out["train.reference_model"])
    return out


def training_key(recipe, pairs, legacy: bool = False, earlier: bool = False) -> dict:
    """What a training run's checkpoints and outputs are made of: the pairs' content (images by
    content), the policy and reference models by content and :func:`train_settings`. ``legacy``: the
    key as the earlier format held it (paths and file times; :mod:`mpo.keys`); ``earlier``: as keys of
    today's format held it before logging settings were left out (:func:`mpo.keys.key_matches`)."""
    from mpo.keys import legacy_records_digest, records_digest
    from mpo.models import folder_identity, legacy_folder_identity

    model = legacy_folder_identity if legacy else folder_identity
    key = {"pairs": (legacy_records_digest if legacy else records_digest)(pairs),
           "policy files": model(recipe.model.policy or ""),
           "reference files": model(recipe.train.reference_model or recipe.model.policy or "")}
    if not (legacy or earlier):
        return {**key, **train_settings(recipe)}
    extra = ("model.policy", "data.on_bad_image") if legacy else ("data.on_bad_image",)
    key.update(train_settings(recipe, "legacy" if legacy else "earlier", extra))
    key.pop("train.save_steps")
    if earlier:
        key["train.reference_model"] = bool(key["train.reference_model"])
    return key


def is_trained(recipe) -> bool:
    """``mpo train``'s run in ``run.output_dir`` finished with this recipe's pairs and settings
    (:func:`mpo.keys.finished`): what ``mpo sweep`` asks of each point."""
    from mpo.keys import finished

    out = Path(recipe.run.output_dir)
    if not finished(out):
        return False
    pairs = _load_pairs(recipe, out, rounds=True).records
    return finished(out, training_key(recipe, pairs), functools.partial(training_key, recipe, pairs, legacy=True),
                    functools.partial(training_key, recipe, pairs, earlier=True))


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
    from mpo.keys import kept_beside

    out = Path(recipe.run.output_dir)
    with run_lock(out), kept_beside(out):
        return _train_locked(recipe, out, resume, ref_cache, quiet, key)


def _train_locked(recipe, out: Path, resume: bool, ref_cache, quiet: bool, key: dict | None) -> Path:
    from mpo.config import save_resolved
    from mpo.errors import writing_into
    from mpo.keys import KEY_FILE, check_key, finished, last_complete_checkpoint
    from mpo.preempt import check, deferred
    from mpo.records import write_json
    from mpo.train.setup import METRICS_FILE, hide_log_dicts, start_afresh, trim_metrics, wandb_scope

    rounds = key is not None  # mpo iterate / mpo train --round, which resume by themselves
    loaded = _load_pairs(recipe, out, rounds)
    key = key if key is not None else training_key(recipe, loaded.records)
    key_file = out / KEY_FILE
    legacy = functools.partial(training_key, recipe, loaded.records, legacy=True)  # keys of an earlier mpo
    earlier = None if rounds else functools.partial(training_key, recipe, loaded.records, earlier=True)
    if finished(out, key, legacy, earlier):
        print(f"{out}: trained earlier with the same data and settings; nothing to do (policy: {out / 'policy'})")
        return out / "policy"
    if resume:
        check_key(out, key, str(out), key_file=key_file, legacy=legacy, earlier=earlier)
    else:
        start_afresh(out, key)
    print(f"resolved recipe: {save_resolved(recipe, out)}")
    model, processor = load_policy(recipe)
    trainer, dataset = build_trainer(recipe, loaded.records, loaded.sources, model, processor, resume)
    precompute_reference(trainer, dataset, recipe, ref_cache)
    report = dataset.report
    data_report = {**report.__dict__, "bad_images_skipped": loaded.skipped}
    write_json(out / "data_report.json", data_report)
    print(f"data: {report.summary()}; {len(loaded.skipped)} skipped for bad images")
    checkpoint = last_complete_checkpoint(out) if resume else None
    if resume:
        print(f"resuming from {checkpoint}" if checkpoint else f"no complete checkpoint in {out}: starting afresh")
    from_step = int(checkpoint.rsplit("-", 1)[1]) if checkpoint else 0
    if trainer.is_world_process_zero():
        trim_metrics(out / METRICS_FILE, from_step)
    if quiet:
        hide_log_dicts(trainer)
    with writing_into(out, "training"), wandb_scope(recipe.run, out), deferred():
        trainer.train(resume_from_checkpoint=checkpoint)
        _stop_if_preempted(trainer, out, rounds)
        policy_dir = save_outputs(trainer, processor, recipe)
        # the padding of this run's training micro-batches (mpo.train.batching), once they have run
        padding = {**trainer.padding_report(), "from_step": from_step}
        write_json(out / "data_report.json", {**data_report, "padding": padding})
    check(f"training finished and saved ({policy_dir}); rerun the same command to continue")
    print(f"policy saved to {policy_dir}")
    return policy_dir


def _stop_if_preempted(trainer, out: Path, rounds: bool) -> None:
    """After a preemption signal stopped training (:class:`mpo.train.setup.StopOnSignal`): the one
    line naming the checkpoint and how to resume."""
    from mpo.preempt import check

    step = trainer.stop_on_signal.stopped_at
    if step is not None:
        again = "rerun the same command" if rounds else "rerun the same command with --resume"
        check(f"checkpoint saved at step {step} of {trainer.state.max_steps} ({out / f'checkpoint-{step}'}); "
              f"{again} to continue from it")
