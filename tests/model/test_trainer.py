"""The MPO trainer end to end on a tiny Qwen2.5-VL (CPU, fp32, one thread): ``mpo train``, frozen vs
trainable parameters, δ across accumulation splits and across an interrupted-and-resumed run,
reference modes, W&B offline logging."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from mpo.config import load_recipe
from mpo.errors import MpoError
from mpo.train.run import build_trainer, load_policy, precompute_reference, run_training

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "tiny" / "mpo_offline.yaml"
PAIRS = REPO / "tests" / "fixtures" / "pairs" / "colour_pairs.jsonl"


def recipe(policy_dir, out, *overrides):
    base = [f"model.policy={policy_dir}", f"data.preferences={PAIRS}", f"run.output_dir={out}"]
    return load_recipe(RECIPE, base + list(overrides))


def logged(out) -> list[dict]:
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss/preference" in r]


def pairs_and_labels():
    from mpo.data import load_preferences

    loaded = load_preferences(PAIRS)
    return loaded.records, loaded.sources


def trainer_for(rec, resume=False):
    model, processor = load_policy(rec)
    pairs, wheres = pairs_and_labels()
    trainer, dataset = build_trainer(rec, pairs, wheres, model, processor, resume=resume)
    precompute_reference(trainer, dataset, rec)
    return trainer


def saved_delta(checkpoint) -> dict:
    """δ as a checkpoint holds it: inside trainer_state.json (transformers' stateful callbacks)."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    return state["stateful_callbacks"]["DeltaState"]["attributes"]["saved"]


def test_mpo_train_cli_lowers_loss_and_saves(tiny_policy_dir, tmp_path):
    from typer.testing import CliRunner

    from mpo.cli import app

    out = tmp_path / "run"
    args = [
        "train",
        str(RECIPE),
        f"model.policy={tiny_policy_dir}",
        f"data.preferences={PAIRS}",
        f"run.output_dir={out}",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"resolved recipe: {out / 'config.yaml'}" in result.output  # one line says where it is
    assert "bco_delta: cumulative" in (out / "config.yaml").read_text()
    for name in (
        "config.yaml",
        "data_report.json",
        "ref_logps.jsonl",
        "mpo_state.json",
        "policy/config.json",
        "policy/model.safetensors",
        "policy/tokenizer.json",
        "policy/processor_config.json",
        "checkpoint-6/trainer_state.json",
    ):
        assert (out / name).is_file(), name
    assert saved_delta(out / "checkpoint-6")["num_windows"] == 6  # a complete checkpoint holds δ
    rows = logged(out)
    assert [r["step"] for r in rows] == list(range(1, 13))
    expected = {"loss", "grad_norm", "learning_rate", "tokens/s", "delta", "logps/chosen", "logps/rejected"}
    expected |= {f"{g}/{p}" for g in ("loss", "weighted") for p in ("preference", "quality", "generation")}
    expected |= {f"rewards/{k}" for k in ("chosen", "rejected", "margins", "accuracies")}
    assert expected <= set(rows[0])
    first, last = rows[:3], rows[-3:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)
    assert mean(last, "loss") < mean(first, "loss") - 0.5
    assert mean(last, "rewards/accuracies") > mean(first, "rewards/accuracies")
    assert mean(last, "rewards/margins") > 0.1
    for r in rows:  # weighted parts are the raw parts times the weights; the total is their sum
        total = sum(r[f"weighted/{p}"] for p in ("preference", "quality", "generation"))
        assert r["weighted/preference"] == pytest.approx(0.8 * r["loss/preference"], rel=1e-6)
        assert r["loss"] == pytest.approx(total, rel=1e-5)

    again = CliRunner().invoke(app, args + ["train.max_steps=1"])  # same run folder: reference reused
    assert again.exit_code == 0, again.output
    assert "reference log-probs: 0 computed, 16 reused" in again.output


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "overrides, trainable",
    [
        ([], lambda n: True),
        (["train.freeze=[vision]"], lambda n: not n.startswith("model.visual.") or ".merger." in n),
        (["train.freeze=[vision,language]"], lambda n: ".merger." in n),  # adapter-only (R1V2)
        (
            ["train.lora={r: 4, alpha: 8, dropout: 0.0}", "train.freeze=[vision]"],
            lambda n: "lora_" in n and "visual.blocks" not in n,
        ),
        (
            ["train.lora={r: 4, alpha: 8, dropout: 0.0}", "train.gradient_checkpointing=true"],
            lambda n: "lora_" in n,
        ),
    ],
    ids=["full", "freeze-vision", "adapter-only", "lora", "lora-checkpointing"],
)
def test_trainable_parameters_change_and_frozen_do_not(tiny_policy_dir, tmp_path, overrides, trainable):
    rec = recipe(tiny_policy_dir, tmp_path / "run", "train.max_steps=2", "train.save_steps=100", *overrides)
    trainer = trainer_for(rec)
    before = _snapshot(trainer.model)
    trainer.train()
    after = _snapshot(trainer.model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    expected = {n for n in before if trainable(n)}
    assert {n for n, p in trainer.model.named_parameters() if p.requires_grad} == expected
    assert expected, "nothing trainable"
    assert changed == expected, (sorted(expected - changed)[:5], sorted(changed - expected)[:5])


def test_delta_same_for_1x8_and_4x2_windows(tiny_policy_dir, tmp_path):
    deltas, states = [], []
    for micro, accumulation in ((1, 8), (4, 2)):
        out = tmp_path / f"{micro}x{accumulation}"
        rec = recipe(
            tiny_policy_dir,
            out,
            "train.max_steps=4",
            f"train.per_device_batch_size={micro}",
            f"train.gradient_accumulation_steps={accumulation}",
            "train.save_steps=100",
        )
        run_training(rec)
        deltas.append([r["delta"] for r in logged(out)])
        states.append(json.loads((out / "mpo_state.json").read_text())["delta"])
    assert deltas[0][:2] == [0.0, 0.0] and deltas[0][2] != 0.0  # step-1 rewards are 0 (reference = start)
    assert deltas[0] == pytest.approx(deltas[1], rel=1e-5, abs=1e-7)
    assert states[0]["value"] == pytest.approx(states[1]["value"], rel=1e-5)
    assert states[0]["num_windows"] == states[1]["num_windows"] == 4


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resume_logs_the_same_losses_and_delta(tiny_policy_dir, tmp_path, lora):
    settings = [
        "train.max_steps=6",
        "train.per_device_batch_size=2",
        "train.gradient_accumulation_steps=2",
        "train.save_steps=3",
        "loss.bco_delta=ema",
        "loss.ema_decay=0.5",
        "train.lr_scheduler=cosine",
    ]
    settings += ["train.lora={r: 4, alpha: 8, dropout: 0.0}", "train.learning_rate=0.01"] if lora else []
    whole = tmp_path / "whole"
    uninterrupted = trainer_for(recipe(tiny_policy_dir, whole, *settings))
    uninterrupted.train()

    broken = tmp_path / "broken"
    first = trainer_for(recipe(tiny_policy_dir, broken, *settings))
    first.add_callback(_StopAt(3))  # 3 steps of 4 pairs: stops mid-epoch (16 pairs)
    first.train()
    assert saved_delta(broken / "checkpoint-3")["num_windows"] == 3
    resumed = trainer_for(recipe(tiny_policy_dir, broken, *settings), resume=True)
    resumed.train(resume_from_checkpoint=True)

    a, b = logged(whole), logged(broken)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "delta", "loss/quality", "rewards/margins", "grad_norm"):
        assert [r[key] for r in b[3:]] == pytest.approx([r[key] for r in a[3:]], rel=1e-5, abs=1e-7), key
    assert a[3]["delta"] != 0.0
    assert resumed.delta.num_windows == uninterrupted.delta.num_windows == 6
    assert resumed.delta.value == pytest.approx(uninterrupted.delta.value, rel=1e-5)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_live_reference_equals_precomputed(tiny_policy_dir, tmp_path, lora):
    extra = ["train.lora={r: 4, alpha: 8, dropout: 0.0}"] if lora else []
    runs = {}
    for mode in ("precomputed", "live"):
        out = tmp_path / mode
        run_training(
            recipe(
                tiny_policy_dir,
                out,
                "train.max_steps=2",
                f"train.reference={mode}",
                "train.save_steps=100",
                *extra,
            )
        )
        runs[mode] = logged(out)
    for key in ("loss", "rewards/chosen", "rewards/margins", "logps/rejected"):
        assert [r[key] for r in runs["live"]] == pytest.approx(
            [r[key] for r in runs["precomputed"]], rel=1e-5, abs=1e-6
        )
    assert not (tmp_path / "live" / "ref_logps.jsonl").exists()
    if lora:
        assert (tmp_path / "live" / "adapter" / "adapter_config.json").is_file()
        assert (tmp_path / "live" / "policy" / "model.safetensors").is_file()


def test_wandb_offline_gets_the_metrics(tiny_policy_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    monkeypatch.setenv("WANDB_DIR", str(out))
    run_training(
        recipe(tiny_policy_dir, out, "run.report_to=wandb", "train.max_steps=2", "train.save_steps=100")
    )
    logs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1
    for _ in range(100):  # the wandb-core service may still be writing the log on a busy machine
        data = logs[0].read_bytes()
        if b"train/grad_norm" in data:
            break
        time.sleep(0.2)
    for key in (
        "loss/preference",
        "weighted/quality",
        "delta",
        "rewards/accuracies",
        "logps/chosen",
        "tokens/s",
        "grad_norm",
    ):
        assert f"train/{key}".encode() in data, key
    shutil.rmtree(out / "wandb")


def test_ddp_two_ranks_match_one_process(tiny_policy_dir, tmp_path):
    """2 CPU ranks x 2 pairs x 2 micro-batches == 1 process x 4 pairs x 2 micro-batches: the same
    windows, so the same all-reduced metrics and δ (gloo, ``ACCELERATE_USE_CPU=true``)."""
    import os
    import subprocess
    import sys

    common = ["train.max_steps=3", "train.gradient_accumulation_steps=2", "train.save_steps=100"]
    single = tmp_path / "single"
    run_training(recipe(tiny_policy_dir, single, "train.per_device_batch_size=4", *common))
    ddp = tmp_path / "ddp"
    args = [
        f"model.policy={tiny_policy_dir}",
        f"data.preferences={PAIRS}",
        f"run.output_dir={ddp}",
        "train.per_device_batch_size=2",
        *common,
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "-m",
        "mpo",
        "train",
        str(RECIPE),
        *args,
    ]
    done = subprocess.run(
        command, check=False, env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = logged(single), logged(ddp)
    assert [r["step"] for r in b] == [1, 2, 3] and b[-1]["epoch"] == pytest.approx(a[-1]["epoch"])
    for key in ("loss", "delta", "loss/quality", "rewards/margins", "logps/chosen", "grad_norm"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], rel=1e-5, abs=1e-6), key
    assert a[2]["delta"] != 0.0


def test_bad_pair_stops_mpo_train_with_file_and_line(tiny_policy_dir, tmp_path):
    from typer.testing import CliRunner

    from mpo.cli import app

    rows = [json.loads(line) for line in PAIRS.read_text().splitlines()][12:14]  # two text-only pairs
    rows[1]["rejected"] = rows[1]["chosen"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(
        app,
        [
            "train",
            str(RECIPE),
            f"model.policy={tiny_policy_dir}",
            f"data.preferences={bad}",
            f"run.output_dir={tmp_path / 'run'}",
        ],
    )
    assert result.exit_code == 2
    assert f"{bad}:2 (prompt_id 'text-1'): chosen and rejected are the same response" in result.output


def test_evaluate_reads_delta_without_updating_it(tiny_policy_dir, tmp_path):
    trainer = trainer_for(
        recipe(tiny_policy_dir, tmp_path / "run", "train.max_steps=3", "train.save_steps=100")
    )
    trainer.train()
    state = trainer.delta.state_dict()
    assert state["num_windows"] == 3
    metrics = trainer.evaluate(eval_dataset=trainer.train_dataset)
    assert trainer.delta.state_dict() == state
    assert metrics["eval_delta"] == pytest.approx(state["value"])
    assert {"eval_loss", "eval_rewards/margins", "eval_loss/quality"} <= set(metrics)


def test_mpo_train_on_mmpr_meta_json(tiny_policy_dir, tmp_path):
    """An MMPR-format set (meta.json -> annotation jsonl, images under root), images and text mixed."""
    images = REPO / "mpo" / "assets" / "demo" / "images"
    rows = [
        {
            "image": "red_0.png",
            "question": "<image>\nWhat colour is this?",
            "chosen": "red",
            "rejected": "blue",
        },
        {
            "image": "blue_1.png",
            "question": "What colour is this?",
            "chosen": "blue",
            "rejected": "It is green.",
        },
        {"question": "What is 2 + 2?", "chosen": "4", "rejected": "5"},
        {
            "image": ["green_0.png", "yellow_0.png"],
            "question": "<image><image>Colours?",
            "chosen": "green, yellow",
            "rejected": "red",
        },
    ]
    (tmp_path / "colours.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta = {"colours": {"root": str(images), "annotation": "colours.jsonl", "repeat_time": 1, "length": 4}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    out = tmp_path / "run"
    rec = recipe(
        tiny_policy_dir,
        out,
        f"data.preferences={tmp_path / 'meta.json'}",
        "train.max_steps=2",
        "train.per_device_batch_size=4",
        "train.gradient_accumulation_steps=1",
        "train.save_steps=100",
    )
    run_training(rec)
    assert [r["step"] for r in logged(out)] == [1, 2]
    assert json.loads((out / "data_report.json").read_text())["kept"] == 4


@pytest.mark.parametrize("mode", ["precomputed", "live"])
def test_separate_reference_model_is_the_reference(tiny_policy_dir, tmp_path, mode):
    """train.reference_model (pi_0 in later rounds of `mpo iterate ... iterate.reference=fixed`):
    the first step's reference-dependent rewards equal a run whose policy *is* that reference model
    (at step 1 the policy's log-probs differ, so compare logps - rewards/beta = reference logps)."""
    from mpo.cli.tiny import save_policy

    other = save_policy(tmp_path / "other", seed=5)
    runs = {}
    for name, policy, extra in [("separate", tiny_policy_dir, [f"train.reference_model={other}"]),
                                ("itself", other, [])]:
        out = tmp_path / name
        run_training(recipe(policy, out, "train.max_steps=1", f"train.reference={mode}", "train.save_steps=100",
                            "loss.bco_delta=none", *extra))
        first = logged(out)[0]
        beta = 0.1
        runs[name] = [first["logps/chosen"] - first["rewards/chosen"] / beta,
                      first["logps/rejected"] - first["rewards/rejected"] / beta]
    assert runs["separate"] == pytest.approx(runs["itself"], rel=1e-5, abs=1e-5)
    # and it is not the starting policy's own reference
    own = tmp_path / "own"
    run_training(recipe(tiny_policy_dir, own, "train.max_steps=1", f"train.reference={mode}", "train.save_steps=100",
                        "loss.bco_delta=none"))
    row = logged(own)[0]
    assert row["logps/chosen"] - row["rewards/chosen"] / 0.1 != pytest.approx(runs["separate"][0], abs=1e-3)


def test_resume_from_a_checkpoint_without_delta_is_refused(tiny_policy_dir, tmp_path):
    settings = ["train.max_steps=4", "train.save_steps=2", "loss.bco_delta=cumulative"]
    out = tmp_path / "run"
    run_training(recipe(tiny_policy_dir, out, *settings))
    for checkpoint in out.glob("checkpoint-*"):  # a checkpoint from before δ was Trainer state
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        del state["stateful_callbacks"]["DeltaState"]
        (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    (out / "mpo_state.json").unlink()
    with pytest.raises(MpoError, match=r"the checkpoint resumed at step 4 holds no δ state \(bco_delta=cumulative\)"):
        run_training(recipe(tiny_policy_dir, out, *settings), resume=True)
