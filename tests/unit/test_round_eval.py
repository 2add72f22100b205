"""iterate.eval (issue 20 item 4): the recipe section, when rounds are evaluated, keys untouched
without it, the live engine's settings kept, the report's table, plot and summary keys, and a
distributed eval's driver side (key, ranks' chunks joined, scored as inline)."""

from pathlib import Path

import pytest

from mpo.config import ConfigError, load_recipe
from mpo.records import ScoredRollout, write_jsonl
from mpo.rounds.driver import eval_due
from mpo.rounds.report import (
    HELD_OUT_PLOT,
    PLOTS,
    format_round_table,
    held_out_points,
    plot_names,
    write_plots,
)


def test_eval_section_defaults_and_absolute_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_recipe(None).iterate.eval is None
    settings = load_recipe(None, ["iterate.eval.data=held/out.jsonl"]).iterate.eval
    assert settings.data == str(tmp_path / "held/out.jsonl")
    assert (settings.benchmark, settings.every, settings.max_tokens, settings.split) == ("answers", 1, 256, None)


@pytest.mark.parametrize("overrides, expected", [
    (["iterate.eval.benchmark=mathvista"], "iterate.eval.data: Field required"),
    (["iterate.eval.data=x.jsonl", "iterate.eval.benchmark=gsm8k"],
     "iterate.eval.benchmark: Input should be 'mathvista', 'mmmu' or 'answers'"),
    (["iterate.eval.data=x.jsonl", "iterate.eval.every=0"], "iterate.eval.every: Input should be greater than or equal to 1"),
    (["iterate.eval.data=x.jsonl", "iterate.eval.max_tokens=0"], "iterate.eval.max_tokens: Input should be greater"),
    (["iterate.eval.data=x.jsonl", "iterate.eval.evry=2"], "iterate.eval.evry: unknown key"),
])
def test_bad_eval_settings_name_the_key(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_recipe(None, overrides)
    assert expected in str(err.value)


def test_eval_changes_no_stage_key():
    """A run with iterate.eval makes the same rollouts, scores, pairs and training as one without."""
    from mpo.keys import PAIRS_SETTINGS, ROLLOUT_SETTINGS, SCORE_SETTINGS, settings
    from mpo.train.run import train_settings

    plain, with_eval = load_recipe(None), load_recipe(None, ["iterate.eval.data=x.jsonl", "iterate.eval.every=2"])
    for names in (ROLLOUT_SETTINGS, SCORE_SETTINGS, PAIRS_SETTINGS):
        assert settings(plain, names) == settings(with_eval, names)
    for form in ("today", "earlier", "legacy"):
        assert train_settings(plain, form) == train_settings(with_eval, form)


@pytest.mark.parametrize("rounds, every, due", [(3, 1, [0, 1, 2]), (5, 2, [1, 3, 4]), (3, 1000, [2]), (4, 2, [1, 3])])
def test_rounds_evaluated_every_n_and_the_last(rounds, every, due):
    recipe = load_recipe(None, [f"iterate.rounds={rounds}", "iterate.eval.data=x.jsonl", f"iterate.eval.every={every}"])
    assert [n for n in range(rounds) if eval_due(recipe, n)] == due


def test_engine_view_samples_greedily_for_one_call_then_gives_the_engine_back(monkeypatch):
    from mpo.rounds import runners
    from mpo.rounds.evaluate import greedy

    monkeypatch.setattr("mpo.rollout.base.check_policy_dir", Path)
    calls = []

    class Engine:
        def __init__(self, config):
            self.config = config

        def wake(self):
            calls.append("wake")

        def refresh(self, policy):
            calls.append(("refresh", Path(policy)))

        def generate(self, prompts, num_samples=None, seed=None):
            calls.append(("generate", self.config.temperature, self.config.max_tokens, num_samples))
            return []

    recipe = load_recipe(None, ["rollout.temperature=0.7", "rollout.max_tokens=64"])
    engine = Engine(recipe.rollout)
    view = runners.EngineView(runners.InlineRunner(recipe, backend=engine), Path("round_000/train/policy"))
    with greedy(view, 8):
        view.generate([], num_samples=1, seed=3)
    assert calls == ["wake", ("refresh", Path("round_000/train/policy")), ("generate", 0.0, 8, 1)]
    assert engine.config is recipe.rollout and view.config is recipe.rollout  # the rounds' sampling is back


ROWS = [{"round": 0, "reward/mean": 0.1, "pairs/kept": 3, "eval_before/answers/accuracy": 0.25,
         "eval/answers/accuracy": 0.5, "eval/answers/category/geometry": 0.4, "eval/right_colour": 0.3},
        {"round": 1, "reward/mean": 0.2, "pairs/kept": 3},
        {"round": 2, "reward/mean": 0.3, "pairs/kept": 2, "eval/answers/accuracy": 0.75}]


def test_table_has_a_before_row_and_accuracy_columns():
    header, before, first, second, third = format_round_table(ROWS).splitlines()
    assert header.split()[-2:] == ["eval/answers/accuracy", "eval/right_colour"]  # per category: summary.json
    assert before.split() == ["before", *["-"] * 6, "0.250", "-"]
    assert first.split()[-2:] == ["0.500", "0.300"] and second.split()[-2:] == ["-", "-"]
    assert third.split()[0] == "2" and third.split()[-2:] == ["0.750", "-"]


def test_held_out_points_count_rounds_trained():
    assert held_out_points(ROWS) == {"eval/answers/accuracy": [(0, 0.25), (1, 0.5), (3, 0.75)]}
    assert plot_names(ROWS) == [*PLOTS, HELD_OUT_PLOT]
    assert plot_names([{"round": 0, "eval/right_colour": 0.5}]) == list(PLOTS)  # not a held-out set


def test_held_out_plot_is_written(tmp_path):
    for n in range(3):
        write_jsonl(tmp_path / f"round_{n:03d}" / "scored.jsonl",
                    [ScoredRollout("p", 0, "r", 1, "stop", "pol", reward=0.1 * n)])
    written = write_plots(tmp_path, ROWS)
    assert [p.stem for p in written] == plot_names(ROWS)
    assert (tmp_path / "plots" / f"{HELD_OUT_PLOT}.png").stat().st_size > 1000


def test_sweep_points_ranked_by_held_out_accuracy_missing_last():
    from mpo.cli.sweep_report import accuracy_key, ranked

    key = accuracy_key(load_recipe(None, ["iterate.eval.data=x.jsonl", "iterate.eval.benchmark=mmmu"]))
    assert key == "eval/mmmu/accuracy" and accuracy_key(load_recipe(None)) is None
    rows = [{"point": "a", key: 0.2}, {"point": "b", key: ""}, {"point": "c", key: 0.7}, {"point": "d", key: 0.2}]
    assert [r["point"] for r in ranked(rows, key)] == ["c", "a", "d", "b"]
    assert ranked(rows[1:2], key) == rows[1:2] and ranked(rows, None) == rows  # nothing to rank by: grid order


GEOMETRY = Path(__file__).resolve().parents[1] / "fixtures" / "geometry3k" / "prompts.jsonl"


class Answering:
    """A backend without a model: each prompt's answer is its id's length, made greedily or not at all."""

    def __init__(self, config, policy_dir):
        self.config, self.policy_dir, self.model_config = config, policy_dir, None

    def generate(self, prompts, num_samples=None, seed=None):
        from mpo.records import Rollout

        assert self.config.temperature == 0.0 and num_samples == 1
        return [Rollout(p.prompt_id, 0, f"The answer is {len(p.prompt_id)}.", 5, "stop", "x") for p in prompts]


def test_distributed_eval_joins_its_ranks_chunks_and_scores_them_as_inline(tmp_path, monkeypatch):
    """LaunchedRunner.evaluate: the key is written before the job starts, the ranks (here called in
    turn, each with the spec they are handed as options) make their chunks, and the driver joins
    and scores them: the inline eval's bytes. A finished eval launches nothing."""
    from mpo.rounds import runners
    from mpo.rounds.driver import load_eval_set
    from mpo.rounds.evaluate import EvalSpec, iterate_spec

    monkeypatch.setattr("mpo.rollout.base.check_policy_dir", Path)
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "model.safetensors").write_bytes(b"weights")
    recipe = load_recipe(None, [f"run.output_dir={tmp_path / 'run'}", "launch.mode=distributed",
                                "launch.nproc_per_node=2", f"iterate.eval.data={GEOMETRY}", "iterate.rollout_chunk=3",
                                "iterate.eval.max_tokens=7", f"model.policy={policy}"])
    problems, launched = load_eval_set(recipe), []
    model = Answering(recipe.rollout, policy)
    model.model_config = recipe.model

    def ranks(spec, log_dir=None):
        assert (Path(spec.out_dir) / "rollouts.key.json").is_file()  # the driver's key, before the job
        handed = EvalSpec.parse(spec.argv())
        assert handed == spec and handed.chunk_size == 3 and handed.max_tokens == 7 and handed.seed == 0
        for rank in (1, 0):
            handed.responses(handed.problems(), model, share=(rank, 2))
        launched.append(spec)

    runner = runners.LaunchedRunner(recipe, tmp_path / "run" / "config.yaml")
    monkeypatch.setattr(runner, "launch_eval", ranks)
    out = tmp_path / "run" / "round_000" / "eval_before"
    metrics = runner.evaluate(problems, policy, out)
    inline = iterate_spec(recipe, policy, tmp_path / "inline").run(problems, model)
    assert metrics == inline and len(launched) == 1 and len(problems) == 10
    for name in ("predictions.jsonl", "scores.json", "rollouts.jsonl"):
        assert (out / name).read_bytes() == (tmp_path / "inline" / name).read_bytes(), name
    assert runner.evaluate(problems, policy, out) == metrics and len(launched) == 1
