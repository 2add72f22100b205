"""``mpo grpo RECIPE [overrides]``: GRPO of a vision-language policy with hybrid rewards and the Selective
Sample Buffer, R1V2's second stage (:func:`mpo.grpo.run.run_grpo`). Rerunning the same command resumes
from the newest complete checkpoint; a finished run is not trained again.

Registered on the app in :mod:`mpo.cli` (typer only at import: ``mpo --help`` stays light).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mpo.cli_common import guarded


@guarded
def grpo_command(
    recipe: Annotated[Path, typer.Argument(help="A YAML recipe (model.policy, data.prompts, grpo; "
                                                "model.reward_model while grpo.rewards.weights.model > 0).")],
    overrides: Annotated[list[str] | None, typer.Argument(help="Recipe overrides, e.g. grpo.beta=0.01 "
                                                              "grpo.ssb.enabled=false")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Start afresh: remove the checkpoints (and the prompt "
                                                        "filter's outcome) of the run in run.output_dir.")] = False,
    filter_prompts: Annotated[bool, typer.Option("--filter-prompts", help="Before training, drop the prompts whose "
                                                 "sampled rewards never differ (grpo.ssb.filter_prompts=true).")]
    = False,
    after_rounds: Annotated[bool, typer.Option("--after-rounds", hidden=True, help="Launched by mpo iterate "
                                               "(iterate.then: grpo, launch.mode: distributed): RECIPE is the "
                                               "run's; GRPO from its last round's policy into RUN/grpo.")] = False,
):
    """GRPO with hybrid rewards (rule, reward model, format) and the Selective Sample Buffer."""
    from mpo.cli_common import check_output_folder
    from mpo.config import load_recipe
    from mpo.grpo.run import run_grpo

    loaded = load_recipe(recipe, [*(overrides or []), *(["grpo.ssb.filter_prompts=true"] if filter_prompts else [])])
    check_output_folder(loaded.run.output_dir, "run.output_dir")
    if after_rounds:
        from mpo.rounds.then_grpo import grpo_rank

        grpo_rank(loaded)
        return
    run_grpo(loaded, resume=not fresh)


def register(app: typer.Typer) -> None:
    app.command("grpo")(grpo_command)
