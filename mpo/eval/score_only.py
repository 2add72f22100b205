"""``mpo eval --score-only``: score existing responses with the benchmarks' own rules, no model.

- MathVista: an official ``output_*.json`` (pid -> problem with ``response`` and, from the official
  pipeline, ``extraction`` / ``prediction``), or the same rows as a JSON list or JSONL. Each problem is
  judged by :func:`mpo.eval.mathvista.judge_output`; the scores have the structure of the benchmark's
  ``scores_*.json`` (:func:`mpo.eval.mathvista.scores_table`).
- MMMU: a folder laid out as MMMU's ``example_outputs/<model>/`` (one ``<Subject>/output.json`` per
  subject), parsed and judged by :mod:`mpo.eval.mmmu`; the scores are MMMU's table (``Overall``, each
  discipline's ``Overall-<discipline>`` and each subject, ``{"num", "acc"}``).

Both write ``--output`` (the scores, JSON) and ``--predictions`` (JSONL, one row per problem: ``pid``
or ``id``, ``extraction``, ``prediction``, ``true_false``).
"""

from __future__ import annotations

import json
from pathlib import Path

from mpo.errors import MpoError
from mpo.eval import mathvista, mmmu

BENCHMARKS = ("mathvista", "mmmu")


def score_mathvista(path: Path, keep_predictions: bool = True) -> tuple[list[dict], dict]:
    """``(prediction rows, scores)`` for a MathVista output file (see :func:`mathvista.judge_output`)."""
    problems = mathvista.load_problems(path)
    rows, judged = [], []
    for problem in problems.values():
        row = mathvista.judge_output(problem, keep_prediction=keep_predictions)
        rows.append(row)
        judged.append({**problem, "true_false": row["true_false"]})
    return rows, mathvista.scores_table(judged)


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MpoError(f"{path}: cannot read JSON: {exc}") from None


def load_mmmu_outputs(folder: Path) -> dict[str, list[dict]]:
    """Subject -> rows of ``<folder>/<Subject>/output.json`` for the MMMU subjects present (as
    ``main_parse_and_eval.py`` finds them); other entries of the folder are ignored."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MpoError(f"{folder}: not a folder of MMMU subjects (<Subject>/output.json)")
    outputs = {}
    for subject in mmmu.SUBJECT_ORDER:
        path = folder / subject / "output.json"
        if path.is_file():
            rows = _read_json(path)
            if not isinstance(rows, list):
                raise MpoError(f"{path}: expected a list of MMMU output rows")
            for i, row in enumerate(rows):
                missing = [k for k in ("id", "question_type", "response") if k not in row]
                if missing:
                    raise MpoError(f"{path}: row {i} has no {missing[0]!r}")
            outputs[subject] = rows
    if not outputs:
        raise MpoError(f"{folder}: no <Subject>/output.json for any MMMU subject (e.g. {folder / 'Math'})")
    return outputs


def score_mmmu(folder: Path, answers: Path | None = None) -> tuple[list[dict], dict]:
    """``(prediction rows, MMMU table)`` for a folder of per-subject outputs; ``answers`` is MMMU's
    ``answer_dict_val.json`` (else each row's ``answer`` is the truth, as ``main_parse_and_eval.py``)."""
    outputs = load_mmmu_outputs(folder)
    key = _read_json(answers) if answers is not None else None
    if key is not None:
        unknown = [row["id"] for rows in outputs.values() for row in rows if row["id"] not in key]
        if unknown:
            raise MpoError(f"{answers}: no answer for id {unknown[0]!r}")
    judged, results = mmmu.evaluate_subjects(outputs, key)
    rows = [{"id": j["id"], "extraction": j["parsed_pred"], "prediction": j["parsed_pred"],
             "true_false": j["correct"]} for j in judged]
    return rows, mmmu.scores_table(results)


def write_outputs(scores: dict, rows: list[dict], output: Path | None, predictions: Path | None) -> None:
    """Write the scores (JSON, indented) and the per-problem predictions (JSONL) where asked."""
    if output is not None:
        Path(output).write_text(json.dumps(scores, indent=4, ensure_ascii=False) + "\n", encoding="utf-8")
    if predictions is not None:
        Path(predictions).write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows),
                                     encoding="utf-8")


def score_only(path: Path, benchmark: str, output: Path | None = None, predictions: Path | None = None,
               answers: Path | None = None) -> dict:
    """Score existing responses at ``path`` for ``benchmark`` and write ``output`` / ``predictions``;
    returns the scores. The entry point for ``mpo eval --score-only PATH --benchmark B``."""
    if benchmark == "mathvista":
        rows, scores = score_mathvista(Path(path))
    elif benchmark == "mmmu":
        rows, scores = score_mmmu(Path(path), answers)
    else:
        raise MpoError(f"--benchmark {benchmark!r}: --score-only reads {' or '.join(BENCHMARKS)} outputs")
    write_outputs(scores, rows, output, predictions)
    return scores


def summary_lines(scores: dict, benchmark: str) -> list[str]:
    """A short printable table: overall, then each group (MathVista breakdowns / MMMU disciplines /
    the answers' categories), with counts."""
    if benchmark == "mmmu":
        return [f"{name:<45} {entry['num']:>5}  {100 * entry['acc']:.1f}" for name, entry in scores.items()]
    average = scores["overall" if benchmark == "answers" else "average"]
    lines = [f"{'overall' if benchmark == 'answers' else 'average':<45} {average['correct']:>4}/{average['total']:<5} "
             f"{average['accuracy']}"]
    for key in ("category",) if benchmark == "answers" else mathvista.BREAKDOWNS:
        lines += [f"{f'{key}/{group}':<45} {entry['correct']:>4}/{entry['total']:<5} {entry['accuracy']}"
                  for group, entry in scores.get(key, {}).items()]
    return lines
