"""Held-out evaluation with the benchmarks' own rules (issue 20), model-free part.

Layer: above :mod:`mpo.rollout`, below :mod:`mpo.rounds`; it imports only the foundation modules
(and later :mod:`mpo.rollout` for generation).

- :mod:`mpo.eval.extract`: :func:`~mpo.eval.extract.extract_answer`, the rule extraction of a final
  answer from a free response (no LLM), shared by eval, ``rule_first`` pairs and a rule reward.
- :mod:`mpo.eval.mathvista`: MathVista's zero-shot query, its answer normalisation and its
  ``scores_*.json`` table (lupantech/MathVista ``evaluation/calculate_score.py``).
- :mod:`mpo.eval.mmmu`: MMMU's prompt, response parsing and per-subject / per-discipline / overall
  accuracy (MMMU-Benchmark/MMMU ``mmmu/utils/eval_utils.py``, ``main_parse_and_eval.py``).
- :mod:`mpo.eval.answers`: ``--benchmark answers``: rows with a ground-truth ``answer``, accuracy overall
  and per category.
- :mod:`mpo.eval.agreement`: how often the rule extraction agrees with MathVista's GPT-4 extraction.
- :mod:`mpo.eval.score_only`: scores existing output files (``mpo eval --score-only``).
"""
