"""How often the rule extraction agrees with MathVista's GPT-4 extraction (issue 20's measure).

For every problem of an official ``output_*.json`` that carries an ``extraction`` (GPT-4's, made by
lupantech/MathVista ``evaluation/extract_answer.py``), the rules read the ``response`` instead
(:func:`mpo.eval.mathvista.rule_extraction`); both extractions go through the official normaliser and
equality test (:func:`mpo.eval.mathvista.judge`, ``calculate_score.py``). Two problems agree when both
come out right or both wrong; the accuracies of the two extractions are reported side by side.

A problem whose ``response`` is empty while its official ``extraction`` is not cannot be measured: the
official ``extract_answer`` returns ``""`` for an empty response, so such a row was changed after its
extraction (343 rows of the repository's own ``output_instruct_blip2_vicuna_13b.json``); those are
counted apart, as ``inconsistent``.
"""

from __future__ import annotations

from mpo.eval.mathvista import judge, rule_extraction


def measure_agreement(problems: dict[str, dict]) -> dict:
    """Agreement of rule and official extraction over the problems that have an official ``extraction``.

    Returns ``{"problems", "agree", "agreement", "same_prediction", "rule_correct", "official_correct",
    "rule_accuracy", "official_accuracy", "disagreements"}`` (accuracies in percent over those problems;
    ``same_prediction`` counts identical normalised predictions; ``disagreements`` lists the pids;
    ``inconsistent`` counts the rows left out, see above)."""
    counted = agree = same = rule_correct = official_correct = inconsistent = 0
    disagreements = []
    for pid, problem in problems.items():
        if problem.get("extraction") is None:
            continue
        if not (problem.get("response") or "").strip() and str(problem["extraction"]).strip():
            inconsistent += 1
            continue
        rule_prediction, rule_right = judge(rule_extraction(problem.get("response") or "", problem), problem)
        official_prediction, official_right = judge(problem["extraction"], problem)
        counted += 1
        agree += rule_right == official_right
        same += rule_prediction == official_prediction
        rule_correct += rule_right
        official_correct += official_right
        if rule_right != official_right:
            disagreements.append(pid)
    share = (lambda k: k / counted) if counted else (lambda k: 0.0)
    return {"problems": counted, "agree": agree, "agreement": share(agree), "same_prediction": same,
            "rule_correct": rule_correct, "official_correct": official_correct,
            "rule_accuracy": 100 * share(rule_correct), "official_accuracy": 100 * share(official_correct),
            "disagreements": disagreements, "inconsistent": inconsistent}
