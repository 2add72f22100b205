"""``mpo iterate`` and the single-stage commands ``mpo rollout|score|pairs RECIPE --round N``
(``mpo train RECIPE --round N`` lives with ``mpo train``). Registered on the app in ``mpo.cli``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mpo.cli_common import guarded
from mpo.errors import MpoError
from mpo.keys import kept_beside
from mpo.run_lock import run_lock

RecipeArg = Annotated[Path, typer.Argument(help="A YAML recipe for mpo iterate.")]
RoundOpt = Annotated[int, typer.Option("--round", "-r", help="The round (0-based) to run this stage for.")]
OverridesArg = Annotated[list[str] | None, typer.Argument(help="Recipe overrides, e.g. rollout.num_samples=4")]


def _layout(recipe: Path, overrides, round_index: int):
    from mpo.cli_common import check_output_folder
    from mpo.config import load_recipe
    from mpo.rounds.layout import RoundLayout

    loaded = load_recipe(recipe, overrides or [])
    check_output_folder(loaded.run.output_dir, "run.output_dir")
    if not 0 <= round_index < loaded.iterate.rounds:
        raise MpoError(f"--round {round_index}: the recipe has rounds 0..{loaded.iterate.rounds - 1}")
    return RoundLayout(loaded)


def _runner(layout):
    """Where the stage runs (``launch.mode``); a launched job reads the resolved recipe from the run folder."""
    from mpo.config import save_resolved
    from mpo.rounds.runners import make_runner

    return make_runner(layout.recipe, save_resolved(layout.recipe, layout.run_dir))


def _need(path: Path, stage: str) -> Path:
    if not path.exists():
        raise MpoError(f"{path} not found: run `mpo {stage}` for this round first")
    return path


@guarded
def iterate_command(recipe: RecipeArg, overrides: OverridesArg = None):
    """N rounds of rollout -> score -> pairs -> MPO; rerun the same command to resume."""
    from mpo.cli_common import check_output_folder
    from mpo.config import load_recipe
    from mpo.rounds.driver import run_iterate

    loaded = load_recipe(recipe, overrides or [])
    check_output_folder(loaded.run.output_dir, "run.output_dir")
    run_iterate(loaded)


@guarded
def rollout_command(recipe: RecipeArg, round_index: RoundOpt = 0, overrides: OverridesArg = None):
    """Sample responses for one round (writes round_NNN/rollouts.jsonl)."""
    from mpo.rounds.driver import check_models, load_round_prompts, stage_rollout
    from mpo.rounds.layout import ROLLOUTS_FILE

    layout = _layout(recipe, overrides, round_index)
    with run_lock(layout.run_dir), kept_beside(layout.run_dir):
        check_models(layout.recipe)
        runner = _runner(layout)
        try:
            rollouts = stage_rollout(layout, round_index, load_round_prompts(layout.recipe), runner)
        finally:
            runner.close()
    typer.echo(f"{len(rollouts)} rollouts in {layout.file(round_index, ROLLOUTS_FILE)}")


@guarded
def score_command(recipe: RecipeArg, round_index: RoundOpt = 0, overrides: OverridesArg = None):
    """Score one round's rollouts with the reward model (writes round_NNN/scored.jsonl)."""
    from mpo.records import Rollout, read_jsonl
    from mpo.rounds.driver import check_models, load_round_prompts, stage_score
    from mpo.rounds.layout import ROLLOUTS_FILE, SCORED_FILE

    layout = _layout(recipe, overrides, round_index)
    with run_lock(layout.run_dir), kept_beside(layout.run_dir):
        check_models(layout.recipe)
        rollouts = read_jsonl(_need(layout.file(round_index, ROLLOUTS_FILE), "rollout"), Rollout)
        prompts = load_round_prompts(layout.recipe)
        scored = stage_score(layout, round_index, prompts, rollouts, _runner(layout))
    typer.echo(f"{len(scored)} scored rollouts in {layout.file(round_index, SCORED_FILE)}")


@guarded
def pairs_command(recipe: RecipeArg, round_index: RoundOpt = 0, overrides: OverridesArg = None):
    """Build one round's preference pairs (writes round_NNN/pairs.jsonl and pair_stats.json)."""
    from mpo.records import ScoredRollout, read_jsonl
    from mpo.rounds.driver import load_round_prompts, stage_pairs
    from mpo.rounds.layout import PAIRS_FILE, SCORED_FILE

    layout = _layout(recipe, overrides, round_index)
    with run_lock(layout.run_dir), kept_beside(layout.run_dir):
        scored = read_jsonl(_need(layout.file(round_index, SCORED_FILE), "score"), ScoredRollout)
        pairs, stats = stage_pairs(layout, round_index, load_round_prompts(layout.recipe), scored)
    typer.echo(f"{len(pairs)} pairs from {stats.prompts_with_pairs}/{stats.prompts_seen} prompts in "
               f"{layout.file(round_index, PAIRS_FILE)}")


def train_round(recipe: Path, overrides, round_index: int, stage_only: bool = False) -> None:
    """``mpo train RECIPE --round N``: MPO on round N's pairs, then the round's manifest (not with
    ``stage_only``: the launched training of ``launch.mode: distributed``, whose driver writes it)."""
    from mpo.records import PreferencePair, ScoredRollout, read_jsonl
    from mpo.rounds.driver import finish_round, load_round_prompts, stage_train
    from mpo.rounds.layout import PAIR_STATS_FILE, PAIRS_FILE, SCORED_FILE
    from mpo.rounds.pairs import read_pair_stats

    layout = _layout(recipe, overrides, round_index)
    with run_lock(layout.run_dir), kept_beside(layout.run_dir):
        pairs = read_jsonl(_need(layout.file(round_index, PAIRS_FILE), "pairs"), PreferencePair)
        prompts = load_round_prompts(layout.recipe)
        layout.repoint_pairs(round_index, prompts, pairs)  # a run moved before this round trained
        policy = stage_train(layout, round_index, prompts, len(pairs))
        if layout.manifest(round_index) is None and not stage_only:
            scored = read_jsonl(layout.file(round_index, SCORED_FILE), ScoredRollout)
            stats = read_pair_stats(layout.file(round_index, PAIR_STATS_FILE))
            finish_round(layout, round_index, scored, stats, policy, {}, {})
    typer.echo(f"round {round_index} policy: {policy}")


def register(app: typer.Typer) -> None:
    app.command("iterate")(iterate_command)
    app.command("rollout")(rollout_command)
    app.command("score")(score_command)
    app.command("pairs")(pairs_command)
