"""The eval stage: one greedy response per held-out problem with a rollout backend, judged by the
benchmark's own rules (:mod:`mpo.eval`).

::

    problems = load_eval_problems("mathvista", "testmini.json")
    metrics = run_eval(problems, backend, out_dir, "mathvista", max_tokens=1024)
    # {"eval/mathvista/accuracy": 0.41, "eval/mathvista/category/math-targeted-vqa": 0.38, ...}

The responses are made chunk by chunk (:func:`mpo.rounds.chunks.run_chunked`, ``out_dir/rollouts.jsonl``),
so a killed eval resumes where it stopped and makes the same predictions. Sampling is greedy with the
``max_tokens`` given here, whatever the recipe's rollout sampling. The stage key (:func:`mpo.keys.check_key`,
kept beside the responses) holds the policy's files, the problems' content and the settings of
:data:`mpo.keys.EVAL_SETTINGS`; finished or partial work made any other way is never reused. When
``scores.json`` exists under a matching key the eval is finished: its metrics are read back and the
backend is never asked for anything (a :class:`LazyBackend` is then never loaded).

Files under ``out_dir``: ``predictions.jsonl`` (one row per problem: ``pid`` or ``id``, ``response``,
``extraction``, ``prediction``, ``true_false``) and ``scores.json`` (the benchmark's own structure:
:func:`mpo.eval.mathvista.scores_table`, :func:`mpo.eval.mmmu.scores_table`,
:func:`mpo.eval.answers.score_answers`), written last.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, fields
from pathlib import Path

from mpo.errors import MpoError
from mpo.eval import answers as answer_rules
from mpo.eval import mathvista, mmmu
from mpo.records import Rollout, write_json, write_jsonl
from mpo.rounds import eval_problems
from mpo.rounds.chunks import run_chunked
from mpo.rounds.eval_problems import EvalProblem
from mpo.rounds.layout import ROLLOUTS_FILE

__all__ = ["BENCHMARKS", "EvalProblem", "EvalSpec", "LazyBackend", "load_eval_problems", "run_eval"]
BENCHMARKS = ("mathvista", "mmmu", "answers")
SCORES_FILE = "scores.json"  # an eval's scores (the benchmark's own structure), written last
PREDICTIONS_FILE = "predictions.jsonl"  # an eval's per-problem judgement


def load_eval_problems(benchmark: str, data: str | Path, split: str | None = None, *,
                       image_cache: str | Path | None = None) -> list[EvalProblem]:
    """The problems of ``data`` for ``benchmark`` (``mathvista``, ``mmmu`` or ``answers``); see
    :mod:`mpo.rounds.eval_problems` for the forms each reads. ``image_cache``: where images stored in
    the data (parquet, ``datasets`` folders) are written as files (default: a folder in the temporary
    directory; files are named by their content)."""
    if benchmark not in BENCHMARKS:
        raise MpoError(f"--benchmark {benchmark!r}: expected one of {', '.join(BENCHMARKS)}")
    path = Path(data)
    if not path.exists():
        raise MpoError(f"{path}: eval data not found")
    cache = Path(image_cache) if image_cache is not None else eval_problems.default_image_cache()
    problems = {"mathvista": eval_problems.mathvista_problems, "mmmu": eval_problems.mmmu_problems,
                "answers": eval_problems.answer_problems}[benchmark](path, split, cache)
    if not problems:
        raise MpoError(f"{path}: no {benchmark} problems")
    return problems


class LazyBackend:
    """A rollout backend made (:func:`mpo.rollout.make_backend`) only when asked to generate, so a
    finished eval loads no model. ``config``, ``model_config`` and ``policy_dir`` are known at once."""

    def __init__(self, rollout_config, model_config, policy_dir, **options):
        from mpo.rollout.base import check_policy_dir

        self.config, self.model_config = rollout_config, model_config
        self.policy_dir = check_policy_dir(policy_dir)
        self.options, self.loaded = options, None

    def generate(self, prompts, num_samples=None, seed=None) -> list[Rollout]:
        if self.loaded is None:
            from mpo.rollout import make_backend

            self.loaded = make_backend(self.config, self.model_config, self.policy_dir, **self.options)
        self.loaded.config = self.config
        return self.loaded.generate(prompts, num_samples=num_samples, seed=seed)

    def close(self) -> None:
        if self.loaded is not None:
            self.loaded.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def greedy(backend, max_tokens: int):
    """``backend`` sampling greedily, one sample of at most ``max_tokens``, inside the block; its own
    rollout settings are back afterwards (a live engine of ``mpo iterate`` keeps serving its rounds)."""
    saved = backend.config
    backend.config = saved.model_copy(update={"temperature": 0.0, "top_p": 1.0, "max_tokens": int(max_tokens),
                                              "num_samples": 1})
    try:
        yield backend
    finally:
        backend.config = saved


def eval_key(problems: list[EvalProblem], backend, benchmark: str, *, max_tokens: int, chunk_size: int,
             seed: int) -> dict:
    """What an eval's results are made of: the policy's files (or the backend's ``policy_identity``, a
    model in training: :mod:`mpo.rounds.grpo_eval`), the problems (prompts by content and images,
    scoring rows by content) and :data:`mpo.keys.EVAL_SETTINGS` with the eval's own settings."""
    from mpo.keys import EVAL_SETTINGS, digest, prompts_identity
    from mpo.models import folder_identity

    sections = {"rollout": backend.config, "model": backend.model_config}
    chosen = {name: getattr(sections[name.split(".")[0]], name.split(".")[1]) for name in EVAL_SETTINGS}
    policy = getattr(backend, "policy_identity", None) or folder_identity(backend.policy_dir)
    return {"benchmark": benchmark, "policy": policy,
            "prompts": prompts_identity([p.prompt for p in problems]),
            "rows": digest([[p.id, p.row] for p in problems]),
            "eval.temperature": 0.0, "eval.max_tokens": int(max_tokens), "eval.chunk_size": int(chunk_size),
            "eval.seed": int(seed), **chosen}


def finished_metrics(out_dir: Path, benchmark: str) -> dict[str, float] | None:
    """The metrics of a finished eval in ``out_dir`` (its ``scores.json``), or None."""
    path = Path(out_dir) / SCORES_FILE
    if not path.is_file():
        return None
    return flat_metrics(benchmark, json.loads(path.read_text(encoding="utf-8")))


@dataclass(frozen=True)
class EvalSpec:
    """One eval: its problems (``benchmark``'s rows in ``data``, ``split``; images stored in the data
    written to ``image_cache``), the ``policy`` folder, the work folder ``out_dir`` and the greedy
    generation's settings. An eval in this process (:meth:`run`) and the ranks of a distributed one
    (``python -m mpo.rounds.rank eval CONFIG`` with :meth:`argv`, read back by :meth:`parse`, each
    making :meth:`responses` of its chunks) make the same chunks from it."""

    benchmark: str
    data: str
    split: str | None
    image_cache: str
    policy: str
    out_dir: str
    max_tokens: int
    chunk_size: int
    seed: int

    def argv(self) -> list[str]:
        """The spec as options (``--name=value``; a ``split`` of None left out)."""
        return [f"--{f.name.replace('_', '-')}={getattr(self, f.name)}" for f in fields(self)
                if getattr(self, f.name) is not None]

    @classmethod
    def parse(cls, argv: list[str]) -> EvalSpec:
        """The spec whose :meth:`argv` is ``argv``."""
        import argparse

        parser = argparse.ArgumentParser(prog="python -m mpo.rounds.rank eval CONFIG")
        for f in fields(cls):
            parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, required=f.name != "split",
                                type=int if f.type == "int" else str)
        return cls(**vars(parser.parse_args(argv)))

    def problems(self) -> list[EvalProblem]:
        return load_eval_problems(self.benchmark, self.data, self.split, image_cache=self.image_cache)

    def _settings(self) -> dict:
        return {"max_tokens": self.max_tokens, "chunk_size": self.chunk_size, "seed": self.seed}

    def check(self, problems: list[EvalProblem], backend) -> dict[str, float] | None:
        """:func:`check_eval` in ``out_dir``: the key checked (written the first time); a finished eval's metrics."""
        return check_eval(problems, backend, Path(self.out_dir), self.benchmark, **self._settings())

    def responses(self, problems: list[EvalProblem], backend, share: tuple[int, int]) -> None:
        """One rank's chunks of the responses (:func:`make_responses` with ``share=(rank, world)``)."""
        make_responses(problems, backend, Path(self.out_dir) / ROLLOUTS_FILE, share=share, **self._settings())

    def run(self, problems: list[EvalProblem], backend, quiet: bool = False) -> dict[str, float]:
        """:func:`run_eval` of ``problems`` (this spec's) with ``backend`` serving ``policy``."""
        return run_eval(problems, backend, Path(self.out_dir), self.benchmark, quiet=quiet, **self._settings())


def iterate_spec(recipe, policy: str | Path = "", out_dir: str | Path = "", monitor: str | None = None
                 ) -> EvalSpec:
    """``iterate.eval`` (or the monitor ``iterate.monitors[monitor]``) of ``policy`` into ``out_dir`` as
    ``mpo iterate`` runs it, inline or distributed: images cached in the run folder,
    ``iterate.rollout_chunk`` problems a chunk, seed 0 (``policy`` and ``out_dir`` left empty where only
    the problems are asked for)."""
    settings = recipe.iterate.eval if monitor is None else recipe.iterate.monitors[monitor]
    return EvalSpec(benchmark=settings.benchmark, data=str(settings.data), split=settings.split,
                    image_cache=str(Path(recipe.run.output_dir) / "image_cache"), policy=str(policy),
                    out_dir=str(out_dir), max_tokens=settings.max_tokens, chunk_size=recipe.iterate.rollout_chunk,
                    seed=0)


def check_eval(problems: list[EvalProblem], backend, out_dir: Path, benchmark: str, *, max_tokens: int,
               chunk_size: int, seed: int) -> dict[str, float] | None:
    """The eval's key (:func:`eval_key`) checked against ``out_dir``'s, written the first time; the
    metrics of a finished eval there (:func:`finished_metrics`), or None."""
    from mpo.keys import check_key

    key = eval_key(problems, backend, benchmark, max_tokens=max_tokens, chunk_size=chunk_size, seed=seed)
    check_key(Path(out_dir) / ROLLOUTS_FILE, key, str(out_dir))
    return finished_metrics(out_dir, benchmark)


def make_responses(problems: list[EvalProblem], backend, responses_file: Path, *, max_tokens: int, chunk_size: int,
                   seed: int, desc: str | None = None, share: tuple[int, int] | None = None) -> list[Rollout] | None:
    """``backend``'s greedy responses to the problems, chunk by chunk into ``responses_file``
    (:func:`mpo.rounds.chunks.run_chunked`; ``share``: one rank's chunks of a distributed eval)."""
    with greedy(backend, max_tokens):
        return run_chunked([p.prompt for p in problems], responses_file, Rollout,
                           lambda chunk, s: backend.generate(chunk, num_samples=1, seed=s),
                           chunk_size=chunk_size, seed=seed, desc=desc, share=share)


def run_eval(problems: list[EvalProblem], backend, out_dir: Path, benchmark: str, *, max_tokens: int,
             chunk_size: int = 16, seed: int = 0, quiet: bool = False) -> dict[str, float]:
    """Greedy responses to ``problems`` from ``backend`` (an :class:`mpo.rollout.base.Backend` or a
    :class:`LazyBackend`), judged and scored by ``benchmark``'s rules into ``out_dir``; returns flat
    metrics (:func:`flat_metrics`). Resumable; a finished ``out_dir`` under the same key is read back."""
    out_dir = Path(out_dir)
    done = check_eval(problems, backend, out_dir, benchmark, max_tokens=max_tokens, chunk_size=chunk_size, seed=seed)
    if done is not None:
        if not quiet:
            print(f"{out_dir}: finished eval reused ({SCORES_FILE} present, same policy, problems and settings)")
        return done
    rollouts = make_responses(problems, backend, out_dir / ROLLOUTS_FILE, max_tokens=max_tokens,
                              chunk_size=chunk_size, seed=seed, desc=None if quiet else f"eval {benchmark}")
    by_id = {r.prompt_id: r.response for r in rollouts}
    responses = {p.id: by_id.get(p.prompt.prompt_id, "") for p in problems}  # a skipped prompt: no answer
    rows, scores = score_responses(benchmark, problems, responses)
    write_jsonl(out_dir / PREDICTIONS_FILE, rows)
    write_json(out_dir / SCORES_FILE, scores)
    return flat_metrics(benchmark, scores)


def score_responses(benchmark: str, problems: list[EvalProblem], responses: dict[str, str]
                    ) -> tuple[list[dict], dict]:
    """``(prediction rows, scores)`` of ``responses`` (problem id -> response) under ``benchmark``'s rules."""
    if benchmark == "mathvista":
        rows, judged = [], []
        for p in problems:
            extraction = mathvista.rule_extraction(responses[p.id], p.row)
            prediction, right = mathvista.judge(extraction, p.row)
            rows.append({"pid": p.id, "response": responses[p.id], "extraction": extraction,
                         "prediction": prediction, "true_false": right})
            judged.append({**p.row, "true_false": right})
        return rows, mathvista.scores_table(judged)
    if benchmark == "mmmu":
        outputs: dict[str, list[dict]] = {}
        for p in problems:
            shown = mmmu.build_prompt(p.row)
            outputs.setdefault(mmmu.subject_of(p.id), []).append(
                {"id": p.id, "question_type": p.row["question_type"], "answer": p.row["answer"],
                 "all_choices": shown["all_choices"], "index2ans": shown["index2ans"], "response": responses[p.id]})
        judged, results = mmmu.evaluate_subjects(outputs)
        rows = [{"id": j["id"], "response": responses[j["id"]], "extraction": j["parsed_pred"],
                 "prediction": j["parsed_pred"], "true_false": j["correct"]} for j in judged]
        return rows, mmmu.scores_table(results)
    judged, scores = answer_rules.score_answers([p.row for p in problems], responses)
    return [{"id": j["id"], "response": responses[j["id"]], **{k: v for k, v in j.items() if k != "id"}}
            for j in judged], scores


def flat_metrics(benchmark: str, scores: dict) -> dict[str, float]:
    """``{"eval/<benchmark>/accuracy": fraction, "eval/<benchmark>/<breakdown>/<value>": fraction, ...}``:
    MathVista every breakdown of its scores file, MMMU each discipline and subject, answers each category."""
    base = f"eval/{benchmark}"
    if benchmark == "mmmu":
        out = {f"{base}/accuracy": float(scores["Overall"]["acc"])}
        for name, entry in scores.items():
            if name.startswith("Overall-"):
                out[f"{base}/discipline/{name[len('Overall-'):]}"] = float(entry["acc"])
            elif name != "Overall":
                out[f"{base}/subject/{name}"] = float(entry["acc"])
        return out
    overall = scores["average" if benchmark == "mathvista" else "overall"]
    out = {f"{base}/accuracy": overall["correct"] / overall["total"]}
    groups = mathvista.BREAKDOWNS if benchmark == "mathvista" else ("category",)
    for breakdown in groups:
        for value, entry in scores.get(breakdown, {}).items():
            out[f"{base}/{breakdown}/{value}"] = entry["correct"] / entry["total"]
    return out
