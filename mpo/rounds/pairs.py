"""Preference pairs from scored rollouts, and the statistics of how they were chosen.

Rollouts are grouped by prompt (prompts in input order, samples by ``sample_idx``), so the result
does not depend on the order of ``scored``. Each strategy proposes candidate (chosen, rejected)
pairs; every candidate goes through one chain of filters; the survivors are ranked by reward
margin (``chosen_reward - rejected_reward``, ties broken by chosen then rejected ``sample_idx``)
and the first ``max_pairs_per_prompt`` are kept. What was dropped is counted in :class:`PairStats`.

Strategies (``PairsConfig.strategy``):

- ``best_vs_worst``: the one pair (highest reward, lowest reward), lowest ``sample_idx`` among
  equals. If that pair fails a filter the prompt gets no pair: no search for a second-best pair
  (use ``top_k`` with ``max_pairs_per_prompt=1`` for that).
- ``top_k``: every two samples with different rewards, oriented high -> low.
- ``rule_first`` (Skywork R1V2's hybrid): correctness decides the direction (chosen correct,
  rejected incorrect); the reward model ranks the correct x incorrect combinations as ``top_k``
  does, so with ``max_pairs_per_prompt=1`` it is the highest-reward correct vs the lowest-reward
  incorrect response. Equal rewards are no tie here, and ``min_margin`` does not apply across
  classes (a kept pair's margin may be <= 0) unless ``rule_apply_margin``. Correctness is
  ``rule_scores["answer"]`` (0 or 1) when present, else :func:`mpo.eval.extract.answer_matches` against
  ``Prompt.answer``. A prompt with no correct (``no_correct``) or no incorrect (``no_incorrect``)
  sample, or a sample whose correctness is unknown (``no_ground_truth``), gets no pair, or with
  ``rule_fallback="reward"`` the ``top_k`` reward-only pairs under ``min_margin``.

Filters, in this order; the first one a candidate fails is its drop reason:
``identical_text`` (stripped responses equal) -> ``tie`` (equal rewards) -> ``empty_response``
(an empty chosen or rejected: the trainer refuses empty responses, so they never enter a pair;
they are counted here) -> ``below_margin`` (margin <= 0 or below
``min_margin``, with a 1e-9 relative tolerance so 0.3 - 0.1 meets 0.2) -> ``length_ratio``
(``chosen.num_tokens > max_length_ratio * max(rejected.num_tokens, 1)``).

A prompt that yields no pair is counted once in ``prompts_dropped``: ``no_samples``,
``single_sample``, ``all_tied``, the rule reasons above, or else the drop reason of its
largest-margin candidate (the pair it would have got). ``pairs_dropped`` counts candidates.
A non-finite reward, an unknown prompt_id or a repeated sample is an error. No torch here.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from bisect import bisect_right
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

from mpo.config import PairsConfig
from mpo.errors import MpoError
from mpo.eval.extract import answer_matches
from mpo.records import PreferencePair, Prompt, ScoredRollout, from_dict, write_json
from mpo.rounds.layout import PAIR_STATS_FILE

PAIR_REASONS = ("identical_text", "tie", "empty_response", "below_margin", "length_ratio")
PROMPT_REASONS = ("no_samples", "single_sample", "all_tied", *PAIR_REASONS,
                  "no_correct", "no_incorrect", "no_ground_truth")

Candidate = tuple[ScoredRollout, ScoredRollout]


@dataclass
class PairStats:
    """What pair building kept and dropped; ``to_json()`` is what ``pair_stats.json`` holds."""

    strategy: str = "best_vs_worst"
    min_margin: float = 0.0
    prompts_seen: int = 0
    prompts_with_pairs: int = 0
    pairs_kept: int = 0
    samples_seen: int = 0
    empty_responses: int = 0  # rollouts whose stripped response is empty (never chosen)
    pairs_capped: int = 0  # valid candidates beyond max_pairs_per_prompt
    fallback_prompts: int = 0  # rule_first prompts whose pairs came from the reward fallback
    prompts_dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PROMPT_REASONS, 0))
    pairs_dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PAIR_REASONS, 0))
    margin_min: float | None = None
    margin_mean: float | None = None
    margin_max: float | None = None
    margin_histogram: dict = field(default_factory=lambda: {"edges": [], "counts": []})

    def to_json(self) -> dict:
        """A JSON-ready dict (plain str/int/float/None/list/dict)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> PairStats:
        return from_dict(cls, obj)


def _stats_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / PAIR_STATS_FILE if path.is_dir() else path


def write_pair_stats(path: str | os.PathLike, stats: PairStats) -> Path:
    """Write ``stats`` atomically; a folder ``path`` gets ``pair_stats.json`` inside it."""
    write_json(path := _stats_path(path), stats.to_json())
    return path


def read_pair_stats(path: str | os.PathLike) -> PairStats:
    return PairStats.from_json(json.loads(_stats_path(path).read_text(encoding="utf-8")))


def margin_histogram(margins: list[float], edges: list[float] | None = None, bins: int = 10) -> dict:
    """Counts of ``margins`` in bins ``[e_i, e_i+1)``, the last bin closed.

    Without ``edges``, ``bins`` equal bins span the data range (a single value ``m`` spans
    ``[m - 0.5, m + 0.5]``, as numpy does). With ``edges``, values outside them are counted in
    ``"outside"``."""
    if edges is None:
        if not margins:
            return {"edges": [], "counts": []}
        low, high = min(margins), max(margins)
        if low == high:
            low, high = low - 0.5, high + 0.5
        edges = [low + (high - low) * i / bins for i in range(bins)] + [high]
    edges = [float(e) for e in edges]
    if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise MpoError(f"histogram edges must be >= 2 increasing values, got {edges}")
    counts = [0] * (len(edges) - 1)
    outside = 0
    for m in margins:
        if m < edges[0] or m > edges[-1]:
            outside += 1
        else:
            counts[min(bisect_right(edges, m) - 1, len(counts) - 1)] += 1
    result = {"edges": edges, "counts": counts}
    if outside:
        result["outside"] = outside
    return result


# --------------------------------------------------------------------------------------- pairs


def _index_prompts(prompts: dict[str, Prompt] | list[Prompt]) -> dict[str, Prompt]:
    items = list(prompts.items()) if isinstance(prompts, dict) else [(p.prompt_id, p) for p in prompts]
    index: dict[str, Prompt] = {}
    for key, prompt in items:
        if key != prompt.prompt_id:
            raise MpoError(f"prompts[{key!r}] holds prompt_id {prompt.prompt_id!r}")
        if key in index:
            raise MpoError(f"prompt_id {key!r} appears twice in prompts")
        index[key] = prompt
    return index


def _group(scored: list[ScoredRollout], prompts: dict[str, Prompt]) -> dict[str, list[ScoredRollout]]:
    groups: dict[str, dict[int, ScoredRollout]] = {}
    for s in scored:
        where = f"prompt_id={s.prompt_id!r} sample_idx={s.sample_idx}"
        if not isinstance(s.reward, (int, float)) or not math.isfinite(s.reward):
            raise MpoError(f"{where}: reward {s.reward!r} is not a finite number")
        if s.prompt_id not in prompts:
            raise MpoError(f"{where}: no such prompt")
        if s.sample_idx in groups.setdefault(s.prompt_id, {}):
            raise MpoError(f"{where}: sample appears twice")
        groups[s.prompt_id][s.sample_idx] = s
    return {pid: [g[i] for i in sorted(g)] for pid, g in groups.items()}


def _meets_margin(margin: float, min_margin: float) -> bool:
    return margin > 0 and margin >= min_margin - 1e-9 * max(1.0, abs(min_margin))


def _drop_reason(c: ScoredRollout, r: ScoredRollout, config: PairsConfig, rewarded: bool) -> str | None:
    """The first filter the candidate fails; ``rewarded``: ties and the margin apply."""
    if c.response.strip() == r.response.strip():
        return "identical_text"
    if rewarded and c.reward == r.reward:
        return "tie"
    if not c.response.strip() or not r.response.strip():
        return "empty_response"
    if rewarded and not _meets_margin(c.reward - r.reward, config.min_margin):
        return "below_margin"
    ratio = config.max_length_ratio
    if ratio is not None and c.num_tokens > ratio * max(r.num_tokens, 1):
        return "length_ratio"
    return None


def _select(candidates: list[Candidate], config: PairsConfig, stats: PairStats, k: int,
            rewarded: bool) -> tuple[list[Candidate], str | None]:
    """Filter, rank by margin, keep ``k``; also the drop reason of the top-ranked candidate."""
    ranked = sorted(candidates, key=lambda p: (p[1].reward - p[0].reward, p[0].sample_idx, p[1].sample_idx))
    kept: list[Candidate] = []
    first_reason = None
    for c, r in ranked:
        reason = _drop_reason(c, r, config, rewarded)
        if reason is not None:
            stats.pairs_dropped[reason] += 1
            first_reason = first_reason or reason
        elif len(kept) < k:
            kept.append((c, r))
        else:
            stats.pairs_capped += 1
    return kept, first_reason


def _reward_pairs(group: list[ScoredRollout], config: PairsConfig, stats: PairStats, k: int,
                  extremes_only: bool) -> tuple[list[Candidate], str | None]:
    if len({s.reward for s in group}) == 1:
        return [], "all_tied"
    if extremes_only:
        best = min(group, key=lambda s: (-s.reward, s.sample_idx))
        worst = min(group, key=lambda s: (s.reward, s.sample_idx))
        candidates = [(best, worst)]
    else:
        candidates = [(a, b) if a.reward >= b.reward else (b, a) for a, b in combinations(group, 2)]
    return _select(candidates, config, stats, k, rewarded=True)


def _correct(s: ScoredRollout, prompt: Prompt) -> bool | None:
    score = s.rule_scores.get("answer")
    if score is not None:
        if score not in (0, 1):
            raise MpoError(f"prompt_id={s.prompt_id!r} sample_idx={s.sample_idx}: "
                             f"rule_scores['answer'] must be 0 or 1, got {score!r}")
        return score == 1
    return None if prompt.answer is None else answer_matches(s.response, prompt.answer)


def _rule_pairs(group: list[ScoredRollout], prompt: Prompt, config: PairsConfig, stats: PairStats,
                k: int) -> tuple[list[Candidate], str | None]:
    flags = [_correct(s, prompt) for s in group]
    correct = [s for s, f in zip(group, flags) if f]
    incorrect = [s for s, f in zip(group, flags) if f is False]
    if None in flags:
        reason = "no_ground_truth"
    else:
        reason = "no_correct" if not correct else "no_incorrect" if not incorrect else None
    if reason is None:
        candidates = [(c, r) for c in correct for r in incorrect]
        return _select(candidates, config, stats, k, rewarded=config.rule_apply_margin)
    if config.rule_fallback == "reward":
        kept, _ = _reward_pairs(group, config, stats, k, extremes_only=False)
        if kept:
            stats.fallback_prompts += 1
            return kept, None
    return [], reason


def build_pairs(prompts: dict[str, Prompt] | list[Prompt], scored: list[ScoredRollout],
                config: PairsConfig | None = None, *, histogram_edges: list[float] | None = None,
                histogram_bins: int = 10) -> tuple[list[PreferencePair], PairStats]:
    """Preference pairs for every prompt (input order), and the statistics of the choice.

    ``histogram_edges`` fixes the margin histogram's bins (to compare rounds); otherwise
    ``histogram_bins`` equal bins span the kept margins."""
    config = config or PairsConfig()
    index = _index_prompts(prompts)
    groups = _group(scored, index)
    k = 1 if config.strategy == "best_vs_worst" else config.max_pairs_per_prompt
    stats = PairStats(strategy=config.strategy, min_margin=config.min_margin, prompts_seen=len(index),
                      samples_seen=len(scored),
                      empty_responses=sum(1 for s in scored if not s.response.strip()))
    pairs: list[PreferencePair] = []
    for prompt_id, prompt in index.items():
        group = groups.get(prompt_id, [])
        kept: list[Candidate] = []
        if len(group) < 2:
            reason = "single_sample" if group else "no_samples"
        elif config.strategy == "rule_first":
            kept, reason = _rule_pairs(group, prompt, config, stats, k)
        else:
            kept, reason = _reward_pairs(group, config, stats, k, config.strategy == "best_vs_worst")
        if not kept:
            stats.prompts_dropped[reason] += 1
            continue
        stats.prompts_with_pairs += 1
        pairs.extend(PreferencePair(prompt_id=prompt_id, messages=copy.deepcopy(prompt.messages),
                                    images=list(prompt.images), chosen=c.response, rejected=r.response,
                                    chosen_reward=c.reward, rejected_reward=r.reward) for c, r in kept)
    margins = [p.chosen_reward - p.rejected_reward for p in pairs]
    stats.pairs_kept = len(pairs)
    if margins:
        stats.margin_min, stats.margin_max = min(margins), max(margins)
        stats.margin_mean = sum(margins) / len(margins)
    stats.margin_histogram = margin_histogram(margins, histogram_edges, histogram_bins)
    return pairs, stats
