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
    RUN/grpo/monitor/<name>/            each of iterate.monitors on RUN/grpo/policy
    RUN/grpo/evals/step-NNNNNN/         iterate.eval.grpo_every: eval/ and monitor/<name>/ of the policy in
                                        training at that step (:mod:`mpo.rounds.grpo_eval`)
    RUN/summary.json    "grpo": where the stage is, its per-step means, its final policy's eval and monitor
                        metrics, final_step and step_evals ([{"step": k, metrics}, ...])
    RUN/plots/grpo_progress.png         reward per GRPO step, eval and monitor accuracy beside it

Resuming is each part's own: the rounds' (:mod:`mpo.rounds.driver`), GRPO's from its newest complete
checkpoint (a finished GRPO run under the same key trains nothing), the eval's by chunks.

Where it runs (``launch.mode``): inline, in the driver's process; distributed, as a job like a round's
training (:meth:`mpo.rounds.runners.LaunchedRunner.grpo`: ``accelerate launch ... -m mpo grpo
RUN/config.yaml --after-rounds`` on every node, ``nproc_per_node x nnodes`` ranks, logs in
``RUN/grpo/logs/grpo/``), each rank :func:`grpo_rank`: under the run's lock (its driver's token, as the
training ranks; :mod:`mpo.run_lock`), :func:`mpo.grpo.run.run_grpo` on :func:`stage_recipe`. Every node
launches it unless the stage finished with the same prompts and settings
(:func:`mpo.grpo.run.is_finished`); a node other than 0 then waits for the finished marker
(:func:`follow_grpo`). Its eval is a job too (:meth:`mpo.rounds.runners.LaunchedRunner.evaluate`).
"""

from __future__ import annotations

from pathlib import Path

from mpo.config import ConfigError, Recipe
from mpo.rounds.layout import EVAL_DIR, MONITOR_DIR, RoundLayout
from mpo.rounds.monitors import eval_sets, evaluate_point, monitor_lines, renamed

GRPO_DIR = "grpo"  # the GRPO stage's run folder, inside the rounds' run folder
MEANS = ("loss", "reward", "kl", "ssb/effective_fraction")  # metrics.jsonl keys (and reward/*) summarised


def check_step_evals(recipe: Recipe) -> None:
    """``iterate.eval.grpo_every`` checked before the run folder is touched: the evals in training run in
    the GRPO stage's process (:mod:`mpo.rounds.grpo_eval`), so with ``launch.mode: inline`` only."""
    settings = recipe.iterate.eval
    if (recipe.iterate.then == "grpo" and settings is not None and settings.grpo_every is not None
            and recipe.launch.mode == "distributed"):
        raise ConfigError("iterate.eval.grpo_every: the evals during GRPO run in the driver's process "
                          "(launch.mode=inline); with launch.mode=distributed set it to null (the final GRPO "
                          "policy is still evaluated)")


def grpo_recipe(recipe: Recipe, policy: Path) -> Recipe:
    """The recipe of the GRPO stage: the run's, from ``policy`` into ``RUN/grpo``."""
    derived = recipe.model_copy(deep=True)
    derived.model.policy = str(policy)
    derived.run.output_dir = str(Path(recipe.run.output_dir) / GRPO_DIR)
    return derived


def stage_recipe(recipe: Recipe) -> Recipe:
    """:func:`grpo_recipe` from the last round's policy (in this run folder: a moved run stays whole)."""
    return grpo_recipe(recipe, RoundLayout(recipe).policy(recipe.iterate.rounds))


def grpo_rank(recipe: Recipe) -> Path:
    """One rank of the distributed GRPO stage (``mpo grpo RUN/config.yaml --after-rounds``; ``recipe``: the
    run's): :func:`mpo.grpo.run.run_grpo` on :func:`stage_recipe` under the run's lock, which its driver
    holds (node 0: the token it was handed; other nodes: once node 0's driver holds it)."""
    from mpo.grpo.run import run_grpo
    from mpo.keys import kept_beside
    from mpo.run_lock import run_lock

    run_dir = Path(recipe.run.output_dir)
    with run_lock(run_dir), kept_beside(run_dir):
        return run_grpo(stage_recipe(recipe))


def follow_grpo(recipe: Recipe, runner) -> Path:
    """A node other than 0 of a distributed run: join the GRPO job node 0 starts (both launch it unless
    the stage finished with the same prompts and settings) and wait for its finished marker; the policy."""
    from mpo.grpo.run import is_finished
    from mpo.keys import TRAINED_FILE
    from mpo.rounds.launch import wait_for

    stage = stage_recipe(recipe)
    out = Path(stage.run.output_dir)
    if not is_finished(stage):
        runner.grpo(out)
    wait_for(out / TRAINED_FILE, "the GRPO stage's finished marker")
    print(f"node {runner.topology.node_rank}: the GRPO stage finished")
    return out / "policy"


def grpo_means(out: Path) -> dict:
    """``train/<key>`` means over the GRPO run's logged steps (:data:`MEANS` and every ``reward/*``)."""
    from mpo.train.setup import METRICS_FILE, metric_means, read_metrics

    rows = [row for row in read_metrics(out / METRICS_FILE) if "loss" in row]
    keys = sorted({k for row in rows for k in row if k in MEANS or k.startswith("reward/")})
    return {"steps": len(rows), **{f"train/{key}": mean for key, mean in metric_means(rows, keys).items()}}


def then_grpo(recipe: Recipe, problems: list | None, runner=None) -> dict:
    """The GRPO stage from the last round's policy (:func:`stage_recipe`), with
    ``iterate.eval.grpo_every`` its evals in training (:class:`mpo.rounds.grpo_eval.StepEvals`), then the
    final policy's evals (:func:`final_evals`; ``problems``: the held-out set's, None to load it); the
    stage's summary entry. ``runner``: the rounds' :class:`mpo.rounds.runners.LaunchedRunner`
    (``launch.mode: distributed``: the stage and its final evals are jobs), or None (this process)."""
    from mpo.grpo.run import is_finished, run_grpo
    from mpo.train.setup import METRICS_FILE, read_metrics

    stage = stage_recipe(recipe)
    policy_in, out = Path(stage.model.policy), Path(stage.run.output_dir)
    print(f"GRPO from the last round's policy ({policy_in}) -> {out}")
    callbacks = None
    if recipe.iterate.eval is not None and recipe.iterate.eval.grpo_every is not None:
        from mpo.rounds.grpo_eval import StepEvals

        callbacks = [StepEvals(recipe, out, policy_in)]
    if runner is None:
        policy_out = run_grpo(stage, callbacks=callbacks, quiet=True)
    else:  # no callbacks: check_step_evals refuses grpo_every here
        if not is_finished(stage):
            runner.grpo(out)
        policy_out = out / "policy"
    summary = {"output_dir": str(out), "policy_in": str(policy_in), "policy_out": str(policy_out),
               **grpo_means(out)}
    if recipe.iterate.eval is not None:
        steps = [row["step"] for row in read_metrics(out / METRICS_FILE) if "loss" in row]
        summary.update(final_evals(recipe, problems, policy_out, out, runner), final_step=max(steps, default=0),
                       step_evals=step_evals(recipe, out))
    return summary


def step_evals(recipe, out: Path) -> list[dict]:
    """``[{"step": k, "eval/<benchmark>/...": ..., "monitor/<name>/...": ...}, ...]``: the finished evals
    under ``out``'s :data:`STEPS_DIR`, read back from their scores (a set not finished there left out)."""
    from mpo.rounds.evaluate import finished_metrics, iterate_spec
    from mpo.rounds.grpo_eval import STEPS_DIR

    rows = []
    for folder in sorted(Path(out, STEPS_DIR).glob("step-*")):
        row: dict = {"step": int(folder.name.removeprefix("step-"))}
        for monitor in eval_sets(recipe):
            place = folder / EVAL_DIR if monitor is None else folder / MONITOR_DIR / monitor
            metrics = finished_metrics(place, iterate_spec(recipe, monitor=monitor).benchmark)
            row.update(renamed(monitor, metrics or {}))
        rows.append(row)
    return rows


def final_evals(recipe, problems: list | None, policy: Path, out: Path, runner=None) -> dict[str, float]:
    """``iterate.eval`` and the monitors of the GRPO stage's saved ``policy`` into ``out/eval`` and
    ``out/monitor/<name>`` (``problems``: the held-out set's, None to load it; a finished eval is read
    back and loads no model), in this process or as ``runner``'s jobs
    (:meth:`mpo.rounds.runners.LaunchedRunner.evaluate`); their flat metrics."""
    from contextlib import nullcontext

    from mpo.rounds.evaluate import LazyBackend, iterate_spec

    with nullcontext() if runner is not None else LazyBackend(recipe.rollout, recipe.model, policy) as backend:
        def evaluate(monitor, given, folder):
            if runner is not None:
                return runner.evaluate(given, policy, folder, monitor)
            return iterate_spec(recipe, policy, folder, monitor).run(given, backend, quiet=True)

        metrics = evaluate_point(recipe, evaluate, out / EVAL_DIR, out / MONITOR_DIR, problems)
    benchmark = recipe.iterate.eval.benchmark
    print(f"GRPO: held-out {benchmark} accuracy {metrics[f'eval/{benchmark}/accuracy']:.1%} -> {out / EVAL_DIR}",
          *monitor_lines(recipe, metrics, "GRPO"), sep="\n")
    return metrics
