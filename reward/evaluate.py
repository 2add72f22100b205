"""Reward-model evaluation: a :class:`reward.scorer.Scorer` wired into ``reward.benchmarks``.

``reward.benchmarks`` turns a benchmark file into scoring items and applies the benchmark's rules
(the benchmarks' own rules, see :mod:`reward.benchmarks`); this module supplies the model: one scorer, one model load, every item of
the file scored in one batched call. For ``pairs`` files the items are each row's chosen and rejected
responses; the row is right iff chosen scores strictly higher. With ``on_too_long="skip"``, items
longer than the scorer's limit are left unscored, listed under ``scoring.skipped_too_long``, and
their rows count as wrong.

Every benchmark row yields two items, in file order, so each item is tagged with its row's
``file:line`` (and which response it is) before scoring: a missing image or an empty response is
reported against the line it came from. Results are the benchmark's dict plus ``model``, ``data``
and a ``scoring`` block (dtype, device, items, seconds); ``output`` writes them as JSON atomically.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from mpo.records import write_json


def _tagged(score_fn, path: str | os.PathLike, counter: dict):
    """Wrap ``score_fn`` so that items carry ``where`` = their row's ``file:line``."""
    from reward.benchmarks import load_rows

    rows = [where for where, _ in load_rows(path)]

    def score(items: list[dict]) -> list[float]:
        counter["items"] = len(items)
        if len(items) == 2 * len(rows):
            items = [{**item, "where": f"{rows[i // 2]} (response {i % 2})"} for i, item in enumerate(items)]
        return score_fn(items)

    return score


def evaluate_model(
    model_dir: str | os.PathLike,
    benchmark: str,
    data: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    **scorer_options: Any,
) -> dict:
    """Score ``data`` with the reward model in ``model_dir`` under ``benchmark``'s rules
    ("vl-rewardbench" | "rewardbench" | "pairs"). ``scorer_options`` go to :class:`Scorer`."""
    from reward.benchmarks import BENCHMARKS, evaluate
    from reward.scorer import ScoreError, Scorer

    if benchmark not in BENCHMARKS:
        raise ScoreError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}")
    if not Path(data).is_file():
        raise ScoreError(f"benchmark data not found: {data}")
    if Path(data).suffix not in (".jsonl", ".parquet"):
        raise ScoreError(f"{data}: unsupported file type {Path(data).suffix!r} (expected .jsonl or .parquet)")
    scorer = Scorer(model_dir, **scorer_options)
    counter: dict[str, int] = {}
    skipped: list[str] = []

    def score_fn(items):
        if scorer.options.on_too_long != "skip":
            return scorer.score(items)
        result = scorer.score_all(items)
        skipped.extend(f"{s.where}: {s.num_tokens} tokens" for s in result.skipped)
        return result.scores

    start = time.perf_counter()
    results = evaluate(benchmark, data, _tagged(score_fn, data, counter), image_root=image_root,
                       unscored_is_wrong=scorer.options.on_too_long == "skip")
    seconds = time.perf_counter() - start
    results["model"] = str(model_dir)
    results["data"] = str(data)
    results["scoring"] = {
        "dtype": scorer.options.dtype,
        "device": scorer.device,
        "items": counter.get("items", 0),
        "seconds": round(seconds, 3),
        "skipped_too_long": skipped,  # unscored items; their rows count as wrong
    }
    if output is not None:
        write_json(output, results)
    return results
