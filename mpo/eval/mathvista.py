"""MathVista (testmini): the zero-shot query, the answer normalisation and the scores table.

Every rule here restates the benchmark's own code, github.com/lupantech/MathVista (commit 53d5258):

- the query: the ``query`` field of its output files and ``data/query.json``: a hint chosen by
  question type, answer type and precision, then ``Question: ...`` (with `` (Unit: u)``), then the
  choices lettered ``(A) ...`` one per line (``evaluation/build_query.py`` holds the hint texts);
- the normalisation of an extracted answer and the equality test: ``normalize_extracted_answer``
  and ``safe_equal`` in ``evaluation/calculate_score.py``;
- the scores file: ``calculate_score.py`` as it was when ``results/*/scores_*.json`` were written
  (first commit ed0d56d): accuracy strings (``str(round(100 * c / n, 2))`` overall, ``"%.2f"`` per
  group), correct/total counts, and nine breakdowns each sorted by accuracy, highest first.

The GPT-4 extraction step of ``evaluation/extract_answer.py`` is replaced by the rules of
:func:`mpo.eval.extract.extract_answer` where an output file has no ``extraction``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from mpo.errors import MpoError
from mpo.eval.extract import extract_answer, final_part

_BRACKETED_LETTER = re.compile(r"\(([A-Za-z])\)")

BREAKDOWNS = ("question_type", "answer_type", "language", "source", "category", "task", "context",
              "grade", "skills")

_CHOICE_HINT = ("Please answer the question and provide the correct option letter, e.g., A, B, C, D, "
                "at the end.")
_VALUE_HINTS = {
    ("integer", None): "Please answer the question requiring an integer answer and provide the final "
                       "value, e.g., 1, 2, 3, at the end.",
    ("float", 1): "Please answer the question requiring a floating-point number with one decimal place "
                  "and provide the final value, e.g., 1.2, 1.3, 1.4, at the end.",
    ("float", 2): "Please answer the question requiring a floating-point number with two decimal places "
                  "and provide the final value, e.g., 1.23, 1.34, 1.45, at the end.",
    ("list", None): "Please answer the question requiring a Python list as an answer and provide the final "
                    "list, e.g., [1, 2, 3], [1.2, 1.3, 1.4], at the end.",
}


def letters(count: int) -> list[str]:
    """``["A", "B", ...]``: the option letters MathVista gives ``count`` choices."""
    return [chr(ord("A") + i) for i in range(count)]


def _hint(row: dict) -> str:
    if row["question_type"] == "multi_choice":
        return _CHOICE_HINT
    answer_type = row["answer_type"]
    precision = row.get("precision")
    key = (answer_type, int(precision) if answer_type == "float" and precision is not None else None)
    if key not in _VALUE_HINTS:
        raise MpoError(f"pid {row.get('pid')!r}: no MathVista hint for answer_type {answer_type!r} "
                       f"with precision {precision!r}")
    return _VALUE_HINTS[key]


def build_query(row: dict) -> str:
    """The benchmark's zero-shot query for one testmini row (its ``query`` field).

    ``Hint: ...`` by question/answer type, ``Question: <question>`` plus `` (Unit: <unit>)`` when the
    row has a unit, then ``Choices:`` and one ``(A) <choice>`` line per choice; lines joined by ``\\n``.
    """
    question = f"Question: {row['question']}"
    if row.get("unit"):
        question += f" (Unit: {row['unit']})"
    lines = [f"Hint: {_hint(row)}", question]
    if row.get("choices"):
        lines.append("Choices:")
        choices = row["choices"]
        lines += [f"({letter}) {choice}" for letter, choice in zip(letters(len(choices)), choices)]
    return "\n".join(lines)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertion, deletion, substitution each cost 1), as ``Levenshtein.distance``."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def nearest_choice(text: str, choices: list[str]) -> str:
    """The choice at the smallest edit distance from ``text``, the first on ties (``get_most_similar``)."""
    distances = [edit_distance(text, choice) for choice in choices]
    return choices[distances.index(min(distances))]


def normalise_extraction(extraction, row: dict) -> str | None:
    """An extracted answer in the form MathVista compares with ``row["answer"]``; None if it has none.

    Multiple choice: the text stripped; a ``(x)`` inside gives its letter (upper-cased); a letter in range
    becomes that choice's text, anything else the nearest choice by edit distance (so an empty
    extraction becomes the shortest choice). Integer: ``str(int(float(x)))``. Float:
    ``str(round(float(x), precision))``. List: ``str(x)``. Conversion failures give None.
    """
    if row["question_type"] == "multi_choice":
        text = extraction.strip() if isinstance(extraction, str) else str(extraction)
        letter = _first_bracketed_letter(text)
        if letter is not None:
            text = letter
        choices = row["choices"]
        options = letters(len(choices))
        return choices[options.index(text)] if text in options else nearest_choice(text, choices)
    answer_type = row["answer_type"]
    try:
        if answer_type == "integer":
            return str(int(float(extraction)))
        if answer_type == "float":
            return str(round(float(extraction), int(row["precision"])))
        if answer_type == "list":
            return str(extraction)
    except (TypeError, ValueError, OverflowError):
        return None
    return extraction


def _first_bracketed_letter(text: str) -> str | None:
    found = _BRACKETED_LETTER.search(text)
    return found.group(1).upper() if found else None


def judge(extraction, row: dict) -> tuple[str | None, bool]:
    """``(prediction, true_false)``: the normalised extraction and whether it equals ``row["answer"]``."""
    prediction = normalise_extraction(extraction, row)
    return prediction, prediction == row["answer"]


def rule_extraction(response: str, row: dict) -> str:
    """The extraction the rules give a MathVista response, in place of the GPT-4 one.

    :func:`~mpo.eval.extract.extract_answer` with the row's choices, answer type and precision. When it
    finds no answer: free form ``""`` (the official ``extract_answer``'s value for a failure, scored
    wrong); multiple choice the response's last line (the GPT-4 extractor mostly repeats such a closing
    statement), which the official normaliser maps to the nearest option, as it does GPT-4's text.
    """
    choices = row.get("choices") if row["question_type"] == "multi_choice" else None
    found = extract_answer(response or "", choices, row.get("answer_type"), row.get("precision"))
    if found is not None:
        return found
    if not choices:
        return ""
    text = final_part(response or "")
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _accuracy(correct: int, total: int) -> dict:
    return {"accuracy": f"{100 * correct / total:.2f}", "correct": correct, "total": total}


def scores_table(judged: list[dict]) -> dict:
    """The ``scores_*.json`` structure for judged problems (rows with ``true_false`` and ``metadata``).

    ``average`` then one group per :data:`BREAKDOWNS` key (from ``metadata``, else the row; ``skills``
    is a list and a problem counts once for each of its skills). Groups keep first-seen order, then are
    sorted by their accuracy string, highest first (a stable sort, as the official ``sorted``; the
    official ``skills`` order among equal accuracies comes from a ``set`` and may differ).
    """
    if not judged:
        raise MpoError("no problems to score")
    correct = sum(1 for row in judged if row["true_false"] is True)
    table: dict = {"average": {"accuracy": str(round(100 * correct / len(judged), 2)), "correct": correct,
                               "total": len(judged)}}
    for key in BREAKDOWNS:
        counts: dict[str, list[int]] = {}
        for row in judged:
            metadata = row.get("metadata") or {}
            value = metadata[key] if key in metadata else row.get(key)  # merged over the row, as official
            for group in (dict.fromkeys(value) if key == "skills" else [value]):
                tally = counts.setdefault(group, [0, 0])
                tally[0] += row["true_false"] is True
                tally[1] += 1
        groups = {group: _accuracy(c, n) for group, (c, n) in counts.items()}
        table[key] = dict(sorted(groups.items(), key=lambda item: float(item[1]["accuracy"]), reverse=True))
    return table


def _parquet_rows(path: Path) -> list[dict]:
    import pyarrow.parquet as pq  # comes with `datasets`; only parquet input needs it

    names = pq.read_schema(path).names
    return pq.read_table(path, columns=[n for n in names if n != "decoded_image"]).to_pylist()


def load_problems(path: Path) -> dict[str, dict]:
    """MathVista problems by pid from ``testmini.json`` (pid -> row, as in the benchmark's repository),
    an ``output_*.json`` (the same, with responses), a JSON list or a JSONL file of rows with ``pid``,
    or the Hugging Face parquet form (``AI4Math/MathVista``; its ``decoded_image`` column is not read)."""
    path = Path(path)
    try:
        if path.suffix == ".parquet":
            data = _parquet_rows(path)
        else:
            text = path.read_text(encoding="utf-8")
            data = [json.loads(line) for line in text.splitlines() if line.strip()] \
                if path.suffix == ".jsonl" else json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise MpoError(f"{path}: cannot read MathVista problems: {exc}") from None
    return checked_rows(list(data.values()) if isinstance(data, dict) else data, path)


def checked_rows(rows, path) -> dict[str, dict]:
    """MathVista rows by pid, each checked for what the query and the scoring read (one line naming
    ``path``, the pid and the missing field)."""
    if not isinstance(rows, list) or not all(isinstance(row, dict) and "pid" in row for row in rows):
        raise MpoError(f"{path}: expected MathVista rows with a 'pid' (pid -> row, a list, or JSONL)")
    missing = [(row["pid"], k) for row in rows for k in ("question_type", "answer_type", "answer")
               if k not in row]
    if missing:
        raise MpoError(f"{path}: pid {missing[0][0]!r} has no {missing[0][1]!r}")
    return {str(row["pid"]): row for row in rows}


def judge_output(problem: dict, keep_prediction: bool = True) -> dict:
    """Judge one problem of an official ``output_*.json``: ``{pid, extraction, prediction, true_false,
    extracted_by}``.

    An ``extraction`` present is the official (GPT-4) one and is normalised by :func:`judge`; a
    ``prediction`` the official scorer already wrote beside it is kept when ``keep_prediction`` (the
    published ``scores_*.json`` were computed by an older ``calculate_score.py`` whose integer rule was
    ``str(int(x))``, so ``"2.0"`` scored wrong there; keeping its prediction reproduces every published
    count). Without an ``extraction``, :func:`rule_extraction` reads the ``response``.
    """
    extraction = problem.get("extraction")
    if extraction is None:
        extraction, by = rule_extraction(problem.get("response") or "", problem), "rules"
        prediction, right = judge(extraction, problem)
    elif keep_prediction and "prediction" in problem:
        by, prediction = "official", problem["prediction"]
        right = prediction == problem["answer"]
    else:
        by = "official"
        prediction, right = judge(extraction, problem)
    return {"pid": str(problem["pid"]), "extraction": extraction, "prediction": prediction,
            "true_false": right, "extracted_by": by}
