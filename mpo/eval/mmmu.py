"""MMMU (validation): the prompt, the response parsing and the per-subject / per-discipline scores.

Every rule restates the benchmark's own code, github.com/MMMU-Benchmark/MMMU (commit bb0b95a):

- the prompt: ``construct_prompt`` in ``mmmu/utils/data_utils.py`` with ``mmmu/configs/llava1.5.yaml``
  (no task instruction; options lettered ``(A) ...``; its closing sentence per question type);
- the parsing: ``parse_multi_choice_response`` and ``parse_open_response`` (with ``extract_numbers``,
  ``normalize_str``) in ``mmmu/utils/eval_utils.py``, including the choice drawn at random for an
  unparseable multiple-choice answer: that module seeds Python's ``random`` with 42 once, and
  ``main_parse_and_eval.py --subject ALL`` parses subjects in ``CAT_SHORT2LONG`` order, samples in
  file order, so the draws follow one ``random.Random(42)`` through that order;
- the judging: ``eval_multi_choice`` / ``eval_open`` in ``eval_utils.py``;
- the table: ``main_eval_only.py`` / ``print_results.py``: per subject ``acc`` = correct / count, per
  discipline (``DOMAIN_CAT2SUB_CAT`` in ``data_utils.py``) and overall the count-weighted mean
  (``calculate_ins_level_acc``), each rounded to 3 decimals.
"""

from __future__ import annotations

import ast
import random
import re

from mpo.errors import MpoError

SEED = 42
DISCIPLINES = {
    "Art and Design": ["Art", "Art_Theory", "Design", "Music"],
    "Business": ["Accounting", "Economics", "Finance", "Manage", "Marketing"],
    "Science": ["Biology", "Chemistry", "Geography", "Math", "Physics"],
    "Health and Medicine": ["Basic_Medical_Science", "Clinical_Medicine",
                            "Diagnostics_and_Laboratory_Medicine", "Pharmacy", "Public_Health"],
    "Humanities and Social Science": ["History", "Literature", "Sociology", "Psychology"],
    "Tech and Engineering": ["Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
                             "Energy_and_Power", "Materials", "Mechanical_Engineering"],
}
# The order main_parse_and_eval.py walks with --subject ALL (the values of data_utils.CAT_SHORT2LONG).
SUBJECT_ORDER = (
    "Accounting", "Agriculture", "Architecture_and_Engineering", "Art", "Art_Theory", "Basic_Medical_Science",
    "Biology", "Chemistry", "Clinical_Medicine", "Computer_Science", "Design",
    "Diagnostics_and_Laboratory_Medicine", "Economics", "Electronics", "Energy_and_Power", "Finance",
    "Geography", "History", "Literature", "Manage", "Marketing", "Materials", "Math",
    "Mechanical_Engineering", "Music", "Pharmacy", "Physics", "Psychology", "Public_Health", "Sociology",
)
MULTI_CHOICE_CLOSING = "Answer with the option's letter from the given choices directly."
OPEN_CLOSING = "Answer the question using a single word or phrase."
_EDGE_PUNCTUATION = [",", ".", "!", "?", ";", ":", "'"]
_KEY_WORDS = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
_GROUPED = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")  # 1,234,567
_SCIENTIFIC = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")  # 1.5e-3
# 12, 1.5, .5 (not followed by an exponent or by a comma and digit)
_PLAIN = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")


def subject_of(sample_id: str) -> str:
    """``validation_Art_Theory_12`` -> ``Art_Theory`` (the id's middle part, as ``main_eval_only.py``)."""
    return "_".join(sample_id.split("_")[1:-1])


def option_list(options) -> list[str]:
    """A row's ``options``: a list, or its string form as MMMU's dataset stores it (``"['a', 'b']"``)."""
    if isinstance(options, str):
        try:
            options = ast.literal_eval(options)
        except (ValueError, SyntaxError):
            raise MpoError(f"MMMU options {options[:60]!r} are not a list") from None
    if not isinstance(options, list):
        raise MpoError(f"MMMU options must be a list, got {type(options).__name__}")
    return [str(option) for option in options]


def build_prompt(row: dict) -> dict:
    """MMMU's prompt for one validation row: ``{"prompt", "all_choices", "index2ans"}``.

    Multiple choice: ``<question>\\n(A) <option>\\n(B) ...\\n\\nAnswer with the option's letter ...``;
    open: ``<question>\\nAnswer the question using a single word or phrase.`` (the ``<image n>``
    placeholders stay in the question, as in the dataset)."""
    if row["question_type"] != "multiple-choice":
        return {"prompt": f"{row['question']}\n{OPEN_CLOSING}", "all_choices": [], "index2ans": {}}
    options = option_list(row["options"])
    index2ans = {chr(ord("A") + i): option for i, option in enumerate(options)}
    listed = "".join(f"({letter}) {option}\n" for letter, option in index2ans.items())
    return {"prompt": f"{row['question']}\n{listed}\n{MULTI_CHOICE_CLOSING}",
            "all_choices": list(index2ans), "index2ans": index2ans}


def parse_multi_choice(response: str, all_choices: list[str], index2ans: dict, rng: random.Random) -> str:
    """The option letter a response picks (``parse_multi_choice_response``).

    A bracketed letter ``(B)``, else a letter standing alone between spaces, else (for responses of more
    than five words) an option's text inside the response (case-insensitive); several: the one
    occurring last; none: ``rng.choice(all_choices)``."""
    for mark in _EDGE_PUNCTUATION:
        response = response.strip(mark)
    padded = f" {response} "
    found = [c for c in all_choices if f"({c})" in padded]
    where = [padded.rfind(f"({c})") for c in found]
    if not found:
        found = [c for c in all_choices if f" {c} " in padded]
        where = [padded.rfind(f" {c} ") for c in found]
    if not found and len(padded.split()) > 5:
        lowered = padded.lower()
        found = [index for index, text in index2ans.items() if text.lower() in lowered]
        where = [lowered.rfind(index2ans[index].lower()) for index in found]
    if not found:
        return rng.choice(all_choices)
    return found[where.index(max(where))]


def normalise_value(text: str) -> list:
    """``normalize_str``: a number -> ``[round(float, 2)]`` (commas dropped); else lower-cased text, a
    single character padded by a space on either side (two entries) to avoid trivial matches."""
    text = text.strip()
    try:
        return [round(float(text.replace(",", "")), 2)]
    except ValueError:
        pass
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def numbers_in(text: str) -> list[str]:
    """``extract_numbers``: comma-grouped numbers, then scientific notation, then plain numbers."""
    return _GROUPED.findall(text) + _SCIENTIFIC.findall(text) + _PLAIN.findall(text)


def _key_parts(response: str) -> list[str]:
    text = response.strip().strip(".").lower()
    # eval_utils splits at ". " before a capital or at newlines, after lower-casing: only newlines remain.
    lines = text.split("\n")
    parts = []
    for i, line in enumerate(lines):
        shortest = None
        for word in _KEY_WORDS + (["="] if i == len(lines) - 1 else []):
            if word in line:
                tail = line.split(word)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in _EDGE_PUNCTUATION:
            parts.append(shortest)
    return parts or [text]


def parse_open(response: str) -> list:
    """The candidate answers of an open response (``parse_open_response``): per line, the shortest tail
    after a key word ("is ", "so ", "answer ", ...; ``=`` on the last line), plus every number in
    those tails, each normalised by :func:`normalise_value`; duplicates dropped."""
    parts = _key_parts(response)
    candidates = parts + [number for part in parts for number in numbers_in(part)]
    normalised = [value for candidate in candidates for value in normalise_value(candidate)]
    return list(dict.fromkeys(normalised))


def judge(question_type: str, truth, parsed) -> bool:
    """``eval_multi_choice`` / ``eval_open``: a letter equal to the truth (or one of a list of truths);
    for open questions a text candidate containing a normalised truth text, or a number candidate
    equal to a normalised truth number."""
    truths = truth if isinstance(truth, list) else [truth]
    if question_type == "multiple-choice":
        return parsed in truths
    normalised = [value for t in truths for value in normalise_value(t)]
    for candidate in parsed:
        if isinstance(candidate, str):
            if any(isinstance(t, str) and t in candidate for t in normalised):
                return True
        elif candidate in normalised:
            return True
    return False


def parse_response(sample: dict, rng: random.Random):
    """The parsed prediction of one ``output.json`` sample (letter, or list of open candidates)."""
    if sample["question_type"] == "multiple-choice":
        return parse_multi_choice(sample["response"], sample["all_choices"], sample["index2ans"], rng)
    return parse_open(sample["response"])


def evaluate_subjects(outputs: dict[str, list[dict]], answers: dict | None = None,
                      seed: int = SEED) -> tuple[list[dict], dict]:
    """Parse and judge per-subject outputs (subject -> ``output.json`` rows) as ``main_parse_and_eval.py``.

    The truth is ``answers[id]["ground_truth"]`` (``answer_dict_val.json``) when given, else the row's
    ``answer``; ``seed`` is MMMU's (42). Returns ``(judged rows: id, subject, question_type,
    parsed_pred, judge, correct; {subject: {"acc", "num_example"}})``."""
    unknown = sorted(set(outputs) - set(SUBJECT_ORDER))
    if unknown:
        raise MpoError(f"unknown MMMU subject(s) {unknown}; expected folders named as {SUBJECT_ORDER[:3]}...")
    rng, judged, results = random.Random(seed), [], {}
    for subject in (s for s in SUBJECT_ORDER if s in outputs):
        correct = 0
        for sample in outputs[subject]:
            parsed = parse_response(sample, rng)
            truth = answers[sample["id"]]["ground_truth"] if answers is not None else sample["answer"]
            ok = judge(sample["question_type"], truth, parsed)
            correct += ok
            judged.append({"id": sample["id"], "subject": subject, "question_type": sample["question_type"],
                           "parsed_pred": parsed, "judge": "Correct" if ok else "Wrong", "correct": ok})
        results[subject] = {"acc": correct / len(outputs[subject]) if outputs[subject] else 0,
                            "num_example": len(outputs[subject])}
    return judged, results


def _weighted(results: list[dict]) -> float:
    total = sum(r["num_example"] for r in results)
    return sum(r["acc"] * r["num_example"] for r in results) / total if total else 0


def scores_table(results: dict) -> dict:
    """MMMU's printed table as a dict (``main_eval_only.py``'s ``printable_results``): per discipline
    ``"Overall-<discipline>"`` then its subjects, each ``{"num", "acc"}``; then ``"Overall"``; acc rounded
    to 3 decimals (a fraction: 0.361 is 36.1%)."""
    table = {}
    for discipline, subjects in DISCIPLINES.items():
        present = [s for s in subjects if s in results]
        table[f"Overall-{discipline}"] = {"num": sum(results[s]["num_example"] for s in present),
                                          "acc": round(_weighted([results[s] for s in present]), 3)}
        for subject in present:
            result = results[subject]
            table[subject] = {"num": result["num_example"], "acc": round(result["acc"], 3)}
    ordered = [results[s] for s in SUBJECT_ORDER if s in results]
    table["Overall"] = {"num": sum(r["num_example"] for r in ordered), "acc": round(_weighted(ordered), 3)}
    return table
