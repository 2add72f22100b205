"""The round driver: rollout -> score -> pairs -> MPO (reference log-probs first) -> checkpoint.

The run folder and the stage keys are :mod:`mpo.rounds.layout`'s.

Round ``n`` rolls out from ``round_{n-1}/train/policy`` (round 0 from ``model.policy``). Every stage
writes its file atomically and is skipped when that file exists; rollout and scoring keep finished
chunks; training resumes from the Trainer's last checkpoint. So a run killed at any moment and started
again continues where it stopped and produces the same pairs. Each stage is also a command of its own
(``mpo rollout|score|pairs|train RECIPE --round N``).

With ``iterate.eval`` the policy is also evaluated on held-out problems (:func:`stage_eval`): the
initial policy at the start of round 0 (``round_000/eval_before/``, metrics ``eval_before/<benchmark>/...``
in round 0's manifest) and the trained policy after every ``every``-th round's training and the last
(``round_NNN/eval/``, metrics ``eval/<benchmark>/...``), before the round's manifest is written (a
killed eval resumes with the round): inline with the run's live rollout engine, distributed as a job
of its own whose ranks make the responses, joined and scored by the driver (the same bytes).

Each stage's output is reused only if it was made the same way (``mpo.keys.check_key``: the
policy, reward model and reference, the prompt set's content and the settings that change results,
kept in ``<stage>.key.json`` beside it); the run folder is locked while a command works in it
(``mpo.run_lock``). Prompts are checked before any model loads (ids, images, and their token
lengths against the policy's limit, ``rollout.on_too_long``). A finished run started again reads
its rounds back and writes nothing.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from mpo.config import CONFIG_FILE, Recipe
from mpo.errors import MpoError
from mpo.records import PreferencePair, Prompt, Rollout, ScoredRollout, read_jsonl, write_json, write_jsonl
from mpo.rounds.chunks import chunk_seed
from mpo.rounds.layout import (
    EVAL_BEFORE_DIR,
    EVAL_DIR,
    MANIFEST_FILE,
    MONITOR_BEFORE_DIR,
    MONITOR_DIR,
    PAIR_STATS_FILE,
    PAIRS_FILE,
    ROLLOUTS_FILE,
    SCORED_FILE,
    RoundLayout,
)


def load_round_prompts(recipe: Recipe, quiet: bool = False) -> list[Prompt]:
    """The recipe's prompts, checked before any model loads: ids, images and token lengths against
    the policy's limit, with ``rollout.on_too_long`` (:func:`mpo.rollout.prompt_set.load_prompt_set`)."""
    from mpo.rollout.prompt_set import load_prompt_set

    return load_prompt_set(recipe, on_too_long=recipe.rollout.on_too_long, setting="rollout.on_too_long",
                           quiet=quiet)


def stage_rollout(layout: RoundLayout, n: int, prompts: list[Prompt], runner) -> list[Rollout]:
    """Sample ``rollout.num_samples`` responses per prompt from round ``n``'s policy (``runner``: a
    :class:`mpo.rounds.runners.StageRunner`)."""
    out = layout.file(n, ROLLOUTS_FILE)
    layout.check(n, ROLLOUTS_FILE, prompts)
    if out.exists():
        return read_jsonl(out, Rollout)
    rollouts = runner.rollout(layout, n, prompts)
    print(f"round {n}: {len(rollouts)} rollouts of {len(prompts)} prompts -> {out}")
    return rollouts


def stage_score(layout: RoundLayout, n: int, prompts: list[Prompt], rollouts: list[Rollout], runner
                ) -> list[ScoredRollout]:
    """Score every rollout with the reward model (empty responses too: pairs counts them)."""
    by_id = {p.prompt_id: p for p in prompts}
    out = layout.file(n, SCORED_FILE)
    layout.check(n, SCORED_FILE, prompts)
    if out.exists():
        return read_jsonl(out, ScoredRollout)
    missing = sorted({r.prompt_id for r in rollouts} - set(by_id))
    if missing:
        raise MpoError(f"{layout.file(n, ROLLOUTS_FILE)}: rollouts of prompts that are not in data.prompts "
                       f"({', '.join(map(repr, missing[:3]))}); delete {layout.redo(n, ROLLOUTS_FILE)}")
    scored = runner.score(layout, n, rollouts, prompts)
    print(f"round {n}: {len(scored)} rollouts scored, mean reward {statistics.fmean(s.reward for s in scored):.3f} -> {out}")
    return scored


def stage_pairs(layout: RoundLayout, n: int, prompts: list[Prompt], scored: list[ScoredRollout]):
    from mpo.rounds.pairs import build_pairs, read_pair_stats, write_pair_stats

    out, stats_path = layout.file(n, PAIRS_FILE), layout.file(n, PAIR_STATS_FILE)
    layout.check(n, PAIRS_FILE, prompts)
    if out.exists() and stats_path.exists():
        return layout.repoint_pairs(n, prompts, read_jsonl(out, PreferencePair)), read_pair_stats(stats_path)
    pairs, stats = build_pairs(prompts, scored, layout.recipe.pairs)
    write_pair_stats(stats_path, stats)
    write_jsonl(out, pairs)
    print(f"round {n}: {len(pairs)} pairs from {stats.prompts_with_pairs}/{stats.prompts_seen} prompts -> {out}")
    return pairs, stats


def load_eval_set(recipe: Recipe) -> list | None:
    """``iterate.eval``'s held-out problems (:func:`mpo.rounds.evaluate.load_eval_problems`), or None
    without ``iterate.eval``."""
    if recipe.iterate.eval is None:
        return None
    from mpo.rounds.evaluate import iterate_spec

    return iterate_spec(recipe).problems()


def eval_due(recipe: Recipe, n: int) -> bool:
    """Round ``n``'s trained policy is evaluated: every ``iterate.eval.every``-th round, and the last."""
    every = recipe.iterate.eval.every
    return (n + 1) % every == 0 or n + 1 == recipe.iterate.rounds


def stage_eval(layout: RoundLayout, n: int, problems: list, runner, policy: Path, before: bool = False) -> dict:
    """``policy`` evaluated on the held-out ``problems`` into round ``n``'s ``eval/`` and on each of
    ``iterate.monitors`` into ``monitor/<name>/`` (:func:`mpo.rounds.monitors.evaluate_point`; ``before``:
    round 0's ``eval_before/`` and ``monitor_before/``, metrics named ``eval_before/...``,
    ``monitor_before/...``); a finished eval is read back."""
    from mpo.rounds.monitors import evaluate_point, monitor_lines

    out = layout.file(n, EVAL_BEFORE_DIR if before else EVAL_DIR)
    metrics = evaluate_point(layout.recipe, lambda monitor, given, folder: runner.evaluate(given, policy, folder, monitor),
                             out, layout.file(n, MONITOR_BEFORE_DIR if before else MONITOR_DIR), problems)
    benchmark = layout.recipe.iterate.eval.benchmark
    accuracy = metrics[f"eval/{benchmark}/accuracy"]
    which = "initial" if before else "trained"
    print(f"round {n}: held-out {benchmark} accuracy {accuracy:.1%} ({which} policy, {len(problems)} problems) -> {out}")
    for line in monitor_lines(layout.recipe, metrics, f"round {n}"):
        print(line)
    if before:
        return {f"{k.split('/', 1)[0]}_before/{k.split('/', 1)[1]}": v for k, v in metrics.items()}
    return metrics


def round_recipe(layout: RoundLayout, n: int) -> Recipe:
    """The recipe ``mpo train`` runs for round ``n``: this round's pairs, policy and folder."""
    recipe = layout.recipe.model_copy(deep=True)
    recipe.model.policy = str(layout.policy(n))
    recipe.data.preferences = str(layout.file(n, PAIRS_FILE))
    recipe.data.image_root = None
    recipe.run.output_dir = str(layout.file(n, "train"))
    recipe.run.seed = chunk_seed(layout.recipe.run.seed, "train", n)
    if layout.recipe.iterate.reference == "fixed" and n > 0:  # round 0 starts from pi_0 anyway
        recipe.train.reference_model = str(layout.reference(n))
    return recipe


def stage_train(layout: RoundLayout, n: int, prompts: list[Prompt], num_pairs: int, runner=None) -> Path:
    """MPO on the round's pairs (``runner``'s way; default: in this process); a round without pairs keeps
    its policy (counted in the manifest)."""
    from mpo.keys import finished
    from mpo.rounds.runners import InlineRunner

    if num_pairs == 0:
        print(f"round {n}: no preference pairs (see {PAIR_STATS_FILE}); the policy is carried over untrained")
        return layout.policy(n)
    train_dir = layout.file(n, "train")
    key = layout.check(n, "train", prompts)
    if finished(train_dir):  # its key checked just above
        return train_dir / "policy"
    resume = any(train_dir.glob("checkpoint-*"))
    print(f"round {n}: MPO on {num_pairs} pairs")
    return (runner or InlineRunner(layout.recipe)).train(layout, n, round_recipe(layout, n), key, resume)


def rollout_metrics(scored: list[ScoredRollout]) -> dict:
    rewards = [s.reward for s in scored]
    deciles = statistics.quantiles(rewards, n=10, method="inclusive") if len(rewards) > 1 else rewards * 9
    return {
        "reward/mean": statistics.fmean(rewards),
        "reward/std": statistics.pstdev(rewards),
        "reward/p10": deciles[0], "reward/p50": deciles[4], "reward/p90": deciles[8],
        "response/tokens_mean": sum(s.num_tokens for s in scored) / len(scored),
        "response/truncated_fraction": sum(s.finish_reason == "length" for s in scored) / len(scored),
        "response/empty": sum(not s.response.strip() for s in scored),
    }


def train_metrics(train_dir: Path) -> dict:
    """Means over the round of the trainer's logged losses, rewards and δ (metrics.jsonl)."""
    from mpo.train.setup import METRICS_FILE, metric_means, read_metrics

    rows = read_metrics(train_dir / METRICS_FILE)
    keys = [k for k in rows[0] if k.startswith(("loss", "rewards/", "delta"))] if rows else []
    out = {f"train/{key}": mean for key, mean in metric_means(rows, keys).items()}
    if rows and isinstance(rows[-1].get("delta"), (int, float)):
        out["train/delta_final"] = rows[-1]["delta"]
    return out


def finish_round(layout: RoundLayout, n: int, scored, stats, policy_out: Path, seconds: dict, extra: dict) -> dict:
    metrics = {"round": n, **rollout_metrics(scored), "pairs/kept": stats.pairs_kept,
               "pairs/prompts_with_pairs": stats.prompts_with_pairs,
               **{f"pairs/dropped/{k}": v for k, v in stats.prompts_dropped.items()},
               "pairs/margin_mean": stats.margin_mean,
               **train_metrics(layout.file(n, "train")), **extra,
               **{f"time/{k}_s": round(v, 2) for k, v in seconds.items()}}
    manifest = {"round": n, "policy_in": str(layout.policy(n)), "reference": str(layout.reference(n)),
                "policy_out": str(policy_out), "trained": stats.pairs_kept > 0, "metrics": metrics}
    write_json(layout.file(n, MANIFEST_FILE), manifest)
    return manifest


def run_round(layout: RoundLayout, n: int, prompts: list[Prompt], runner, extra_metrics=None,
              problems: list | None = None) -> dict:
    """One round, every finished stage checked against its key and skipped; returns the manifest.
    ``problems``: ``iterate.eval``'s held-out set (:func:`stage_eval`), evaluated before the manifest."""
    seconds, held_out = {}, {}
    start = time.perf_counter()
    if problems is not None and n == 0 and layout.manifest(0) is None:
        held_out = stage_eval(layout, 0, problems, runner, layout.policy(0), before=True)
        seconds["eval_before"], start = time.perf_counter() - start, time.perf_counter()
    rollouts = stage_rollout(layout, n, prompts, runner)
    seconds["rollout"], start = time.perf_counter() - start, time.perf_counter()
    scored = stage_score(layout, n, prompts, rollouts, runner)
    seconds["score"], start = time.perf_counter() - start, time.perf_counter()
    pairs, stats = stage_pairs(layout, n, prompts, scored)
    seconds["pairs"], start = time.perf_counter() - start, time.perf_counter()
    policy_out = stage_train(layout, n, prompts, len(pairs), runner)
    seconds["train"] = time.perf_counter() - start
    done = layout.manifest(n)
    if done is not None:
        return done
    if problems is not None and eval_due(layout.recipe, n):
        start = time.perf_counter()
        held_out.update(stage_eval(layout, n, problems, runner, policy_out))
        seconds["eval"] = time.perf_counter() - start
    extra = {**(extra_metrics(prompts, scored) if extra_metrics else {}), **held_out}
    return finish_round(layout, n, scored, stats, policy_out, seconds, extra)


def run_iterate(recipe: Recipe, extra_metrics=None, backend=None, scorer=None) -> list[dict]:
    """All rounds of ``recipe``; finished rounds and stages are skipped. Returns the manifests.

    With ``launch.mode: distributed`` each stage runs as its own job (:mod:`mpo.rounds.runners`), the
    ``iterate.eval`` stages too (:meth:`mpo.rounds.runners.LaunchedRunner.evaluate`); on a node other
    than 0 this only joins those jobs (:func:`follow_rounds`). With ``iterate.then: grpo`` the GRPO stage
    follows the rounds (:func:`mpo.rounds.then_grpo.then_grpo`; distributed, a job too), its entry in
    ``summary.json``."""
    from mpo.config import save_resolved
    from mpo.keys import kept_beside
    from mpo.rounds.report import RunReport
    from mpo.rounds.runners import make_runner
    from mpo.rounds.then_grpo import check_step_evals, then_grpo
    from mpo.run_lock import run_lock

    layout = RoundLayout(recipe)
    check_step_evals(recipe)
    if recipe.launch.mode == "distributed":
        from mpo.rounds.launch import topology

        if not topology(recipe.launch).main_node:
            return follow_rounds(layout)
    check_models(recipe)  # before the run folder is touched
    with run_lock(layout.run_dir), kept_beside(layout.run_dir):
        prompts = load_round_prompts(recipe)
        problems = load_eval_set(recipe) if not layout.finished() else None
        layout.check_finished(prompts)
        config = layout.run_dir / CONFIG_FILE
        if not (config.is_file() and layout.finished()):  # a finished run (perhaps copied here) is only read
            config = save_resolved(recipe, layout.run_dir)
        print(f"resolved recipe: {config}")
        report = RunReport(recipe, layout.run_dir)
        runner = make_runner(recipe, config, backend, scorer)
        manifests = []
        try:
            for n in range(recipe.iterate.rounds):
                finished = layout.manifest(n) is not None
                if not finished:
                    report.start()
                manifest = run_round(layout, n, prompts, runner, extra_metrics, problems)
                manifests.append(manifest)
                if not finished:
                    report.round_done(manifest, layout.file(n, SCORED_FILE), prompts)
        finally:
            runner.close()
        launched = runner if recipe.launch.mode == "distributed" else None  # the GRPO stage a job too
        grpo = then_grpo(recipe, problems, launched) if recipe.iterate.then == "grpo" else None
        report.finish(manifests, grpo)
    return manifests


def follow_rounds(layout: RoundLayout) -> list[dict]:
    """A node other than 0 of a distributed run: join each stage job node 0 starts (the same
    launches, meeting at the rendezvous), and wait for node 0 to write what follows each."""
    from mpo.keys import finished
    from mpo.rounds.launch import wait_for
    from mpo.rounds.runners import LaunchedRunner

    config = layout.run_dir / CONFIG_FILE
    wait_for(config, "the resolved recipe")
    runner = LaunchedRunner(layout.recipe, config)
    held_out = layout.recipe.iterate.eval is not None
    for n in range(layout.recipe.iterate.rounds):
        if layout.manifest(n) is not None:
            continue
        if held_out and n == 0:
            follow_eval(layout, runner, layout.policy(0), layout.file(0, EVAL_BEFORE_DIR),
                        layout.file(0, MONITOR_BEFORE_DIR))
        for stage, name in (("rollout", ROLLOUTS_FILE), ("score", SCORED_FILE)):
            if not layout.file(n, name).exists():
                runner.launch(layout, n, stage)
            wait_for(layout.file(n, name), name)
        wait_for(layout.file(n, PAIR_STATS_FILE), PAIR_STATS_FILE)
        trained = finished(layout.file(n, "train"))  # node 0 checked its key
        pairs_kept = json.loads(layout.file(n, PAIR_STATS_FILE).read_text())["pairs_kept"]
        if pairs_kept and not trained:
            runner.launch(layout, n, "train")
        if held_out and eval_due(layout.recipe, n):  # the policy stage_train gave node 0
            policy = layout.file(n, "train") / "policy" if pairs_kept else layout.policy(n)
            follow_eval(layout, runner, policy, layout.file(n, EVAL_DIR), layout.file(n, MONITOR_DIR))
        wait_for(layout.file(n, MANIFEST_FILE), "the round's manifest")
    print(f"node {runner.topology.node_rank}: every round finished")
    if layout.recipe.iterate.then == "grpo":
        from mpo.rounds.then_grpo import follow_grpo

        policy = follow_grpo(layout.recipe, runner)
        if held_out:
            follow_eval(layout, runner, policy, policy.parent / EVAL_DIR, policy.parent / MONITOR_DIR)
    return [layout.manifest(n) for n in range(layout.recipe.iterate.rounds)]


def follow_eval(layout: RoundLayout, runner, policy: Path, out_dir: Path, monitor_dir: Path) -> None:
    """A node other than 0: join the eval jobs of ``policy`` that node 0 starts (it does while the
    responses are not joined: :meth:`mpo.rounds.runners.LaunchedRunner.evaluate_spec`), into ``out_dir``
    and each monitor's into ``monitor_dir/<name>`` in node 0's order, and wait for node 0's scores."""
    from mpo.rounds.evaluate import SCORES_FILE, iterate_spec
    from mpo.rounds.launch import wait_for
    from mpo.rounds.monitors import eval_sets

    for monitor in eval_sets(layout.recipe):
        folder = out_dir if monitor is None else monitor_dir / monitor
        if not (folder / ROLLOUTS_FILE).exists():
            runner.launch_eval(iterate_spec(layout.recipe, policy, folder, monitor))
        wait_for(folder / SCORES_FILE, SCORES_FILE)


def check_models(recipe: Recipe) -> None:
    """Every model the rounds will load (policy, reward model, a separate reference), checked before
    the first loads and before round 0's rollout: architecture, weights, value head shapes, tokenizer
    and processor files (:func:`mpo.models.check_model_folder`; one line naming the key and file).
    Later loads of the same folders in this process find them checked."""
    from mpo.models import model_folder
    from mpo.rounds.runners import reward_model_folder

    model_folder(recipe.model.policy or "", "model.policy")
    reward_model_folder(recipe)
    if recipe.train.reference_model:
        model_folder(recipe.train.reference_model, "train.reference_model")
