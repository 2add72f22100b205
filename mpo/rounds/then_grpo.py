"""``iterate.then: grpo``: R1V2's second stage after the MPO rounds, in the same ``mpo iterate`` command
(arXiv 2504.16656: MPO with the reward model, then GRPO with hybrid rewards and the Selective Sample Buffer).

After the last round (and its held-out eval) :func:`then_grpo` runs :func:`mpo.grpo.run.run_grpo` on
:func:`grpo_recipe`: the run's recipe with ``model.policy`` = the last round's trained policy and
``run.output_dir`` = ``RUN/grpo``; the prompts (``data.prompts``), models' settings and the ``grpo``
section are the run's. With ``iterate.eval`` the GRPO stage's policy is evaluated like a round's
(:func:`mpo.rounds.evaluate.iterate_spec`) into ``RUN/grpo/eval/``. Files::

    RUN/grpo/           mpo grpo's run folder (run_key.json, config.yaml, metrics.jsonl, checkpoint-N/,
                        policy/, mpo_state.json: :mod:`mpo.grpo.run`)
    RUN/grpo/eval/      iterate.eval of RUN/grpo/policy (predictions.jsonl, scores.json)
    RUN/summary.json    "grpo": where the stage is, its per-step means and its held-out metrics

Resuming is each part's own: the rounds' (:mod:`mpo.rounds.driver`), GRPO's from its newest complete
checkpoint (a finished GRPO run under the same key trains nothing), the eval's by chunks. GRPO runs in
the driver's process: ``launch.mode: distributed`` is refused for it (:func:`check_then`).
"""

from __future__ import annotations

from pathlib import Path

from mpo.config import ConfigError, Recipe
from mpo.rounds.layout import EVAL_DIR, RoundLayout

GRPO_DIR = "grpo"  # the GRPO stage's run folder, inside the rounds' run folder
MEANS = ("loss", "reward", "kl", "ssb/effective_fraction")  # metrics.jsonl keys (and reward/*) summarised


def check_then(recipe: Recipe) -> None:
    """``iterate.then`` checked before the run folder is touched: one line where it cannot run."""
    if recipe.iterate.then == "grpo" and recipe.launch.mode == "distributed":
        raise ConfigError("iterate.then: grpo runs in the driver's process, not as distributed jobs: use "
                          "launch.mode=inline, or run mpo grpo (accelerate launch -m mpo grpo ...) on the last "
                          "round's policy")


def grpo_recipe(recipe: Recipe, policy: Path) -> Recipe:
    """The recipe of the GRPO stage: the run's, from ``policy`` into ``RUN/grpo``."""
    derived = recipe.model_copy(deep=True)
    derived.model.policy = str(policy)
    derived.run.output_dir = str(Path(recipe.run.output_dir) / GRPO_DIR)
    return derived


def grpo_means(out: Path) -> dict:
    """``train/<key>`` means over the GRPO run's logged steps (:data:`MEANS` and every ``reward/*``)."""
    from mpo.train.setup import METRICS_FILE, metric_means, read_metrics

    rows = [row for row in read_metrics(out / METRICS_FILE) if "loss" in row]
    keys = sorted({k for row in rows for k in row if k in MEANS or k.startswith("reward/")})
    return {"steps": len(rows), **{f"train/{key}": mean for key, mean in metric_means(rows, keys).items()}}


def then_grpo(recipe: Recipe, problems: list | None) -> dict:
    """The GRPO stage from the last round's policy (in this run folder: a moved run stays whole), then
    its held-out eval with ``iterate.eval`` (``problems``: its problems, None to load them); the stage's
    summary entry."""
    from mpo.grpo.run import run_grpo

    policy_in = RoundLayout(recipe).policy(recipe.iterate.rounds)
    stage = grpo_recipe(recipe, policy_in)
    out = Path(stage.run.output_dir)
    print(f"GRPO from the last round's policy ({policy_in}) -> {out}")
    policy_out = run_grpo(stage)
    summary = {"output_dir": str(out), "policy_in": str(policy_in), "policy_out": str(policy_out),
               **grpo_means(out)}
    if recipe.iterate.eval is not None:
        summary.update(grpo_eval(recipe, problems, policy_out, out / EVAL_DIR))
    return summary


def grpo_eval(recipe: Recipe, problems: list | None, policy: Path, out_dir: Path) -> dict:
    """``iterate.eval`` of the GRPO stage's ``policy`` into ``out_dir`` (a finished eval is read back and
    loads no model); its flat metrics."""
    from mpo.rounds.evaluate import LazyBackend, iterate_spec

    spec = iterate_spec(recipe, policy, out_dir)
    problems = spec.problems() if problems is None else problems
    with LazyBackend(recipe.rollout, recipe.model, policy) as backend:
        metrics = spec.run(problems, backend, quiet=True)
    benchmark = recipe.iterate.eval.benchmark
    print(f"GRPO: held-out {benchmark} accuracy {metrics[f'eval/{benchmark}/accuracy']:.1%} "
          f"({len(problems)} problems) -> {out_dir}")
    return metrics
