"""``mpo eval``: held-out accuracy of a policy under a benchmark's own rules, or of existing responses.

- ``mpo eval RECIPE --benchmark B --data D``: the recipe's policy (``--policy`` for another folder, e.g.
  ``round_002/policy``) answers each problem greedily with the recipe's rollout backend
  (:func:`mpo.rounds.evaluate.run_eval`, resumable in a work folder), then the answers are scored.
  With ``launch.mode: distributed`` the answers are made by a job of ``launch.nproc_per_node`` ranks
  (:meth:`mpo.rounds.runners.LaunchedRunner.evaluate_spec`; the resolved recipe is saved in the work
  folder for them), then joined and scored here: the same files as in one process (one node only).
- ``mpo eval --score-only PATH --benchmark B``: no model (:func:`mpo.eval.score_only.score_only`);
  with ``--data``, PATH is this toolkit's ``predictions.jsonl`` and its responses are judged again
  against the problems of ``--data``.

Registered on the app in :mod:`mpo.cli` (typer only at import: ``mpo --help`` stays light).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from mpo.cli_common import guarded
from mpo.errors import MpoError

BENCHMARK_HELP = "mathvista, mmmu or answers (prompt rows with an 'answer')."


def work_folder(recipe, benchmark: str, output: Path | None, work_dir: Path | None) -> Path:
    """Where the eval's responses, predictions and scores are kept: ``--work-dir``, else beside
    ``--output`` (``<output stem>.eval/``), else ``run.output_dir/eval/<benchmark>``."""
    if work_dir is not None:
        return work_dir
    if output is not None:
        return output.with_name(f"{output.stem}.eval")
    return Path(recipe.run.output_dir) / "eval" / benchmark


def _copy_out(folder: Path, output: Path | None, predictions: Path | None) -> None:
    from mpo.cli_common import write_or_recover
    from mpo.records import atomic_write_text
    from mpo.rounds.evaluate import PREDICTIONS_FILE, SCORES_FILE

    for source, target in ((folder / SCORES_FILE, output), (folder / PREDICTIONS_FILE, predictions)):
        if target is not None and target.absolute() != source.absolute():
            text = source.read_text(encoding="utf-8")
            write_or_recover(target, lambda path, text=text: atomic_write_text(path, text), target.name)


def print_table(scores: dict, benchmark: str, where: Path | None) -> None:
    from mpo.eval.score_only import summary_lines

    typer.echo("\n".join(summary_lines(scores, benchmark)))
    if where is not None:
        typer.echo(f"scores: {where}")


def generate_and_score(recipe_path: Path, overrides, benchmark: str, data: Path, *, policy: Path | None,
                       split: str | None, max_tokens: int, chunk_size: int, output: Path | None,
                       predictions: Path | None, work_dir: Path | None) -> None:
    from mpo.config import load_recipe, save_resolved
    from mpo.keys import kept_beside
    from mpo.rounds.evaluate import SCORES_FILE, EvalSpec, LazyBackend
    from mpo.rounds.runners import LaunchedRunner
    from mpo.run_lock import run_lock

    recipe = load_recipe(recipe_path, overrides or [])
    policy = policy or recipe.model.policy
    if not policy:
        raise MpoError("model.policy: the policy to evaluate is required (or pass --policy DIR)")
    if recipe.launch.mode == "distributed" and recipe.launch.nnodes > 1:
        raise MpoError(f"launch.nnodes {recipe.launch.nnodes}: mpo eval runs its ranks on one node (launch.nnodes=1, "
                       "launch.nproc_per_node ranks); on several nodes, evaluate with iterate.eval in mpo iterate")
    folder = work_folder(recipe, benchmark, output, work_dir)
    spec = EvalSpec(benchmark=benchmark, data=str(data), split=split, image_cache=str(folder / "images"),
                    policy=str(policy), out_dir=str(folder), max_tokens=max_tokens, chunk_size=chunk_size,
                    seed=recipe.rollout.seed)
    problems = spec.problems()
    folder.mkdir(parents=True, exist_ok=True)  # after the data was read: a bad --data leaves nothing behind
    typer.echo(f"{len(problems)} {benchmark} problems from {data}; policy {policy}; work folder {folder}")
    with run_lock(folder), kept_beside(folder):
        if recipe.launch.mode == "distributed":
            LaunchedRunner(recipe, save_resolved(recipe, folder)).evaluate_spec(spec, problems, folder / "logs")
        else:
            with LazyBackend(recipe.rollout, recipe.model, policy) as backend:
                spec.run(problems, backend)
    _copy_out(folder, output, predictions)
    print_table(json.loads((folder / SCORES_FILE).read_text(encoding="utf-8")), benchmark,
                output or folder / SCORES_FILE)


def rescore(path: Path, benchmark: str, data: Path | None, split: str | None, output: Path | None,
            predictions: Path | None, answers: Path | None) -> None:
    """``--score-only``: official outputs (H5's :func:`mpo.eval.score_only.score_only`), or with
    ``--data`` this toolkit's ``predictions.jsonl`` judged again against those problems."""
    from mpo.eval.score_only import score_only, write_outputs

    if data is None:
        if benchmark == "answers":
            raise MpoError("--score-only --benchmark answers: pass --data, the prompt rows with their answers")
        print_table(score_only(path, benchmark, output, predictions, answers), benchmark, output)
        return
    from mpo.records import iter_jsonl
    from mpo.rounds.evaluate import load_eval_problems, score_responses

    responses = {}
    for number, row in iter_jsonl(path):
        key = row.get("pid", row.get("id")) if isinstance(row, dict) else None
        if key is None or not isinstance(row.get("response"), str):
            raise MpoError(f"{path}:{number}: expected a predictions row with 'pid' or 'id' and 'response'")
        responses[str(key)] = row["response"]
    problems = load_eval_problems(benchmark, data, split)
    missing = [p.id for p in problems if p.id not in responses]
    if missing:
        raise MpoError(f"{path}: no response for problem {missing[0]!r} of {data} ({len(missing)} missing)")
    rows, scores = score_responses(benchmark, problems, responses)
    write_outputs(scores, rows, output, predictions)
    print_table(scores, benchmark, output)


@guarded
def eval_command(
    recipe: Annotated[Path | None, typer.Argument(help="A YAML recipe: its model.policy, model and rollout "
                                                       "sections (omit with --score-only).")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="Recipe overrides, e.g. rollout.backend=hf")] = None,
    benchmark: Annotated[str, typer.Option(help=BENCHMARK_HELP)] = "",
    data: Annotated[Path | None, typer.Option(help="The problems: MathVista testmini.json (images/ beside it), "
                                                   "parquet or datasets folder; MMMU validation parquet/folder; "
                                                   "any prompt file with answers.")] = None,
    output: Annotated[Path | None, typer.Option(help="Write the scores (JSON) here.")] = None,
    predictions: Annotated[Path | None, typer.Option(help="Write one JSON line per problem here.")] = None,
    score_only: Annotated[Path | None, typer.Option("--score-only", help="Score existing responses, no model: "
                                                    "MathVista output_*.json, an MMMU outputs folder, or (with "
                                                    "--data) this toolkit's predictions.jsonl.")] = None,
    answers: Annotated[Path | None, typer.Option(help="MMMU answer_dict_val.json (--score-only).")] = None,
    split: Annotated[str | None, typer.Option(help="The split of a datasets folder / parquet folder.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Greedy response length limit.", min=1)] = 1024,
    chunk_size: Annotated[int, typer.Option(help="Problems per resumable chunk.", min=1)] = 16,
    policy: Annotated[Path | None, typer.Option(help="Evaluate this policy folder instead of model.policy.")] = None,
    work_dir: Annotated[Path | None, typer.Option(help="The eval's work folder (default: beside --output, "
                                                       "else run.output_dir/eval/<benchmark>).")] = None,
):
    """Held-out accuracy with a benchmark's own rules: generate greedily and score, or --score-only."""
    from mpo.cli_common import check_output_file
    from mpo.rounds.evaluate import BENCHMARKS

    if benchmark not in BENCHMARKS:
        raise MpoError(f"--benchmark {benchmark!r}: expected one of {', '.join(BENCHMARKS)}")
    for value, option, example in ((output, "--output", "scores.json"), (predictions, "--predictions", "predictions.jsonl")):
        if value is not None:
            check_output_file(value, option, example)
    if score_only is not None:
        if recipe is not None:
            overrides = [str(recipe), *(overrides or [])]
        if overrides:
            raise MpoError(f"--score-only loads no model: no recipe or overrides ({overrides[0]})")
        return rescore(score_only, benchmark, data, split, output, predictions, answers)
    if recipe is None or data is None:
        raise MpoError("mpo eval RECIPE --benchmark B --data FILE_OR_FOLDER (or --score-only PATH --benchmark B)")
    generate_and_score(recipe, overrides, benchmark, data, policy=policy, split=split, max_tokens=max_tokens,
                       chunk_size=chunk_size, output=output, predictions=predictions, work_dir=work_dir)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
