"""iterate.eval.grpo_every and iterate.monitors (issue 21 item 4): the settings, which GRPO steps are
evaluated, the callback's schedule and log rows, the eval leaving training as it was, the eval sets of a
point (held-out first, then each monitor into its folder, metrics renamed), and the report's columns,
curves and GRPO plot."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mpo.config import ConfigError, load_recipe
from mpo.errors import MpoError

EVAL = ["iterate.eval.data=held.jsonl"]


def test_settings_default_to_none_and_monitors_need_the_held_out_eval(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(None, EVAL)
    assert recipe.iterate.eval.grpo_every is None and recipe.iterate.monitors == {}
    recipe = load_recipe(None, [*EVAL, "iterate.eval.grpo_every=5", "iterate.monitors.hallu.data=h.jsonl",
                                "iterate.monitors.hallu.benchmark=mmmu"])
    monitor = recipe.iterate.monitors["hallu"]
    assert recipe.iterate.eval.grpo_every == 5
    assert (monitor.data, monitor.benchmark, monitor.max_tokens) == (str(tmp_path / "h.jsonl"), "mmmu", 256)


@pytest.mark.parametrize("overrides, expected", [
    ([*EVAL, "iterate.eval.grpo_every=0"], "iterate.eval.grpo_every: Input should be greater than or equal to 1"),
    (["iterate.monitors.hallu.data=h.jsonl"], "monitors: evaluated where iterate.eval is; set iterate.eval too"),
    ([*EVAL, "iterate.monitors.hallu.benchmark=answers"], "iterate.monitors.hallu.data: Field required"),
    ([*EVAL, "iterate.monitors.hallu.every=2"], "iterate.monitors.hallu.every: unknown key"),
    ([*EVAL, "iterate.monitors.hall/u.data=h.jsonl"], "monitors: 'hall/u' is not a folder-safe name"),
])
def test_bad_settings_name_the_key(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_recipe(None, overrides)
    assert expected in str(err.value)


def test_evals_in_training_refuse_a_distributed_stage():
    from mpo.rounds.then_grpo import check_step_evals

    base = [*EVAL, "iterate.then=grpo", "launch.mode=distributed"]
    check_step_evals(load_recipe(None, base))  # the final policy's eval alone: fine
    with pytest.raises(ConfigError, match="iterate.eval.grpo_every: .*launch.mode=inline"):
        check_step_evals(load_recipe(None, [*base, "iterate.eval.grpo_every=2"]))


@pytest.mark.parametrize("every, max_steps, steps", [(2, 7, [2, 4, 6]), (2, 6, [2, 4]), (1, 3, [1, 2]),
                                                     (10, 5, []), (None, 5, [])])
def test_steps_evaluated_every_n_before_the_last(every, max_steps, steps):
    from mpo.rounds.grpo_eval import due

    assert [k for k in range(1, max_steps + 1) if due(k, every, max_steps)] == steps


def _callback(tmp_path, every=2):
    from mpo.rounds.grpo_eval import StepEvals

    recipe = load_recipe(None, [*EVAL, f"iterate.eval.grpo_every={every}"])
    return StepEvals(recipe, tmp_path / "grpo", tmp_path / "policy")


def test_callback_evaluates_due_steps_and_logs_them_at_that_step(tmp_path, monkeypatch):
    from transformers import TrainerControl

    callback = _callback(tmp_path)
    made = []
    monkeypatch.setattr(callback, "evaluate", lambda model, step: made.append(step) or {"eval/answers/accuracy": step / 10})
    logged = []
    for step in range(1, 6):
        control = TrainerControl()
        callback.on_step_end(SimpleNamespace(), SimpleNamespace(global_step=step, max_steps=5), control, model=None)
        logged.append(control.should_log)
        if control.should_log:
            assert callback.pending == {"eval/answers/accuracy": step / 10}
            callback.pending = {}  # what MpoGRPOTrainer.log does with it
    assert made == [2, 4] and logged == [False, True, False, True, False]


def test_callback_refuses_several_processes_and_names_the_run_by_its_key(tmp_path):
    from mpo.keys import KEY_FILE, digest

    callback = _callback(tmp_path)
    (tmp_path / "grpo").mkdir()
    (tmp_path / "grpo" / KEY_FILE).write_text(json.dumps({"a": 1}))
    with pytest.raises(MpoError, match="iterate.eval.grpo_every: .* this GRPO run has 2"):
        callback.on_train_begin(SimpleNamespace(world_size=2), None, None)
    callback.on_train_begin(SimpleNamespace(world_size=1), None, None)
    assert callback.run_key == digest({"a": 1})


def test_the_eval_leaves_training_as_it_was():
    from transformers import GenerationConfig

    from mpo.rounds.grpo_eval import training_left_alone

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.5)).train()
    model.generation_config = GenerationConfig(max_new_tokens=5)

    def draws():
        return torch.rand(3).tolist(), random.random(), np.random.rand()

    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    expected = draws()
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    with training_left_alone(model):
        assert not model.training
        draws()
        model.generation_config.max_new_tokens = 99
    assert model.training and model.generation_config.max_new_tokens == 5
    assert draws() == expected


def test_a_point_evaluates_the_held_out_set_then_each_monitor_into_its_folder(tmp_path, monkeypatch):
    from mpo.rounds import monitors

    recipe = load_recipe(None, [*EVAL, "iterate.monitors.hallu.data=h.jsonl", "iterate.monitors.hallu.benchmark=mmmu",
                                "iterate.monitors.ocr.data=o.jsonl"])
    monkeypatch.setattr(monitors, "set_problems", lambda recipe, monitor: [f"problems of {monitor}"])
    calls = []

    def run_one(monitor, problems, out):
        calls.append((monitor, problems, out))
        benchmark = "answers" if monitor != "hallu" else "mmmu"
        return {f"eval/{benchmark}/accuracy": 0.5, f"eval/{benchmark}/category/x": 0.25}

    metrics = monitors.evaluate_point(recipe, run_one, tmp_path / "eval", tmp_path / "monitor", ["held"])
    assert calls == [(None, ["held"], tmp_path / "eval"), ("hallu", ["problems of hallu"], tmp_path / "monitor/hallu"),
                     ("ocr", ["problems of ocr"], tmp_path / "monitor/ocr")]
    assert metrics == {"eval/answers/accuracy": 0.5, "eval/answers/category/x": 0.25,
                       "monitor/hallu/accuracy": 0.5, "monitor/hallu/category/x": 0.25,
                       "monitor/ocr/accuracy": 0.5, "monitor/ocr/category/x": 0.25}
    assert monitors.monitor_lines(recipe, metrics, "round 0") == [
        "round 0: monitor hallu (mmmu) accuracy 50.0%", "round 0: monitor ocr (answers) accuracy 50.0%"]
    assert monitors.evaluate_point(load_recipe(None), run_one, tmp_path, tmp_path) == {}  # no iterate.eval


ROWS = [{"round": 0, "reward/mean": 0.1, "pairs/kept": 3, "eval_before/answers/accuracy": 0.25,
         "monitor_before/hallu/accuracy": 0.9, "eval/answers/accuracy": 0.5, "monitor/hallu/accuracy": 0.8},
        {"round": 1, "reward/mean": 0.2, "pairs/kept": 3, "eval/answers/accuracy": 0.75, "monitor/hallu/accuracy": 0.7}]


def test_monitors_get_columns_and_curves_beside_the_held_out_eval():
    from mpo.rounds.report import format_round_table, held_out_points

    header, before, *_ = format_round_table(ROWS).splitlines()
    assert header.split()[-2:] == ["eval/answers/accuracy", "monitor/hallu/accuracy"]
    assert before.split()[0] == "before" and before.split()[-2:] == ["0.250", "0.900"]
    assert held_out_points(ROWS) == {"eval/answers/accuracy": [(0, 0.25), (1, 0.5), (2, 0.75)],
                                     "monitor/hallu/accuracy": [(0, 0.9), (1, 0.8), (2, 0.7)]}


def test_grpo_progress_plot_is_written(tmp_path):
    from mpo.records import ScoredRollout, write_jsonl
    from mpo.rounds.report import GRPO_PLOT, plot_names, write_plots

    for n in range(2):
        write_jsonl(tmp_path / f"round_{n:03d}" / "scored.jsonl", [ScoredRollout("p", 0, "r", 1, "stop", "pol", reward=0.1)])
    write_jsonl(tmp_path / "grpo" / "metrics.jsonl", [{"step": k, "loss": 0.1, "reward": 0.2 * k} for k in (1, 2, 3)])
    grpo = {"output_dir": str(tmp_path / "grpo"), "final_step": 3, "eval/answers/accuracy": 0.6,
            "monitor/hallu/accuracy": 0.5, "step_evals": [{"step": 2, "eval/answers/accuracy": 0.7}]}
    written = write_plots(tmp_path, ROWS, grpo)
    assert [p.stem for p in written] == plot_names(ROWS, grpo) and written[-1].stem == GRPO_PLOT
    assert Path(written[-1]).stat().st_size > 1000
