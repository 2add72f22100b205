"""Pair building: each strategy on hand-worked groups, the filters, the stats file, determinism."""

import json
import math
import random

import pytest

from mpo.config import PairsConfig
from mpo.eval.extract import answer_matches
from mpo.records import Prompt, ScoredRollout
from mpo.rounds.pairs import (
    PAIR_REASONS,
    PROMPT_REASONS,
    PairStats,
    build_pairs,
    margin_histogram,
    read_pair_stats,
    write_pair_stats,
)

MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Find x."}]}]


def prompt(pid="p1", answer=None):
    return Prompt(pid, MESSAGES, [f"{pid}.png"], answer=answer)


def roll(idx, text, reward, pid="p1", tokens=None, answer=None):
    rules = {} if answer is None else {"answer": float(answer)}
    return ScoredRollout(pid, idx, text, len(text.split()) if tokens is None else tokens, "stop", "round_000",
                         reward=reward, rule_scores=rules)


def pairs_of(pairs):
    return [(p.chosen, p.rejected, p.chosen_reward, p.rejected_reward) for p in pairs]


def dropped(stats):
    """The non-zero prompt-level drop counts."""
    return {k: v for k, v in stats.prompts_dropped.items() if v}


# Rewards 1, 3, -2, 3: "B" and "D" tie for best (B has the lower sample_idx), "C" is worst.
GROUP = [roll(0, "A", 1.0), roll(1, "B", 3.0), roll(2, "C", -2.0), roll(3, "D", 3.0)]


# ----------------------------------------------------------------------------- best_vs_worst


def test_best_vs_worst_picks_extremes_with_lowest_index_among_equals():
    pairs, stats = build_pairs([prompt()], GROUP, PairsConfig(strategy="best_vs_worst"))
    assert pairs_of(pairs) == [("B", "C", 3.0, -2.0)]
    p = pairs[0]
    assert (p.prompt_id, p.messages, p.images) == ("p1", MESSAGES, ["p1.png"])
    assert (stats.prompts_seen, stats.prompts_with_pairs, stats.pairs_kept) == (1, 1, 1)
    assert stats.margin_min == stats.margin_mean == stats.margin_max == 5.0


def test_best_vs_worst_ignores_max_pairs_per_prompt():
    pairs, _ = build_pairs([prompt()], GROUP, PairsConfig(strategy="best_vs_worst", max_pairs_per_prompt=5))
    assert pairs_of(pairs) == [("B", "C", 3.0, -2.0)]


@pytest.mark.parametrize("strategy", ["best_vs_worst", "top_k"])
def test_all_tied_gives_no_pair(strategy):
    scored = [roll(i, t, 2.0) for i, t in enumerate(["a", "b", "c"])]
    pairs, stats = build_pairs([prompt()], scored, PairsConfig(strategy=strategy, max_pairs_per_prompt=3))
    assert pairs == [] and stats.prompts_with_pairs == 0
    assert dropped(stats) == {"all_tied": 1}


@pytest.mark.parametrize("strategy", ["best_vs_worst", "top_k", "rule_first"])
def test_single_sample_and_no_samples_are_counted(strategy):
    pairs, stats = build_pairs([prompt("p1", "A"), prompt("p2", "A")], [roll(0, "A", 1.0)],
                               PairsConfig(strategy=strategy))
    assert pairs == []
    assert dropped(stats) == {"single_sample": 1, "no_samples": 1}


def test_min_margin_boundary():
    config = PairsConfig(strategy="best_vs_worst", min_margin=15.0)
    pairs, _ = build_pairs([prompt()], [roll(0, "good", 15.0), roll(1, "bad", 0.0)], config)
    assert pairs_of(pairs) == [("good", "bad", 15.0, 0.0)]  # equal to the threshold: kept
    pairs, stats = build_pairs([prompt()], [roll(0, "good", 14.999), roll(1, "bad", 0.0)], config)
    assert pairs == [] and dropped(stats) == {"below_margin": 1}
    assert stats.pairs_dropped["below_margin"] == 1
    # float round-off does not drop a margin that equals the threshold: 0.3 - 0.1 = 0.19999999999999998
    pairs, _ = build_pairs([prompt()], [roll(0, "good", 0.3), roll(1, "bad", 0.1)],
                           PairsConfig(min_margin=0.2))
    assert len(pairs) == 1


@pytest.mark.parametrize("strategy", ["best_vs_worst", "top_k"])
def test_identical_texts_with_different_rewards_are_no_pair(strategy):
    scored = [roll(0, "The answer is B.", 2.0), roll(1, "  The answer is B.\n", 1.0)]
    pairs, stats = build_pairs([prompt()], scored, PairsConfig(strategy=strategy))
    assert pairs == [] and dropped(stats) == {"identical_text": 1}
    assert stats.pairs_dropped["identical_text"] == 1


# ------------------------------------------------------------------------------------ top_k


def test_top_k_orders_by_margin_then_index_and_caps():
    # candidates: B>C 5, D>C 5, A>C 3, B>A 2, D>A 2, B=D tie
    pairs, stats = build_pairs([prompt()], GROUP, PairsConfig(strategy="top_k", max_pairs_per_prompt=3))
    assert pairs_of(pairs) == [("B", "C", 3.0, -2.0), ("D", "C", 3.0, -2.0), ("A", "C", 1.0, -2.0)]
    assert stats.pairs_capped == 2 and stats.pairs_dropped["tie"] == 1
    assert (stats.margin_min, stats.margin_mean, stats.margin_max) == (3.0, 13 / 3, 5.0)


def test_top_k_min_margin_drops_small_gaps():
    config = PairsConfig(strategy="top_k", max_pairs_per_prompt=10, min_margin=2.5)
    pairs, stats = build_pairs([prompt()], GROUP, config)
    assert pairs_of(pairs) == [("B", "C", 3.0, -2.0), ("D", "C", 3.0, -2.0), ("A", "C", 1.0, -2.0)]
    assert stats.pairs_dropped == {"identical_text": 0, "tie": 1, "empty_response": 0, "below_margin": 2,
                                   "length_ratio": 0}
    assert stats.pairs_capped == 0


def test_top_k_skips_identical_pair_but_keeps_the_others():
    scored = [roll(0, "X", 2.0), roll(1, " X", 1.0), roll(2, "Y", 0.0)]
    pairs, stats = build_pairs([prompt()], scored, PairsConfig(strategy="top_k", max_pairs_per_prompt=5))
    assert pairs_of(pairs) == [("X", "Y", 2.0, 0.0), (" X", "Y", 1.0, 0.0)]
    assert stats.pairs_dropped["identical_text"] == 1


# ------------------------------------------------------------------------------- filters


def test_empty_response_never_enters_a_pair():
    scored = [roll(0, "  ", 9.0), roll(1, "Answer: A", 2.0), roll(2, "Answer: B", 1.0), roll(3, "", 0.0)]
    # best_vs_worst: the reward model prefers an empty response -> the prompt is not trusted
    pairs, stats = build_pairs([prompt()], scored[:3], PairsConfig(strategy="best_vs_worst"))
    assert pairs == [] and dropped(stats) == {"empty_response": 1}
    assert stats.empty_responses == 1
    # top_k: every candidate with an empty side is dropped (the trainer refuses empty responses)
    pairs, stats = build_pairs([prompt()], scored, PairsConfig(strategy="top_k", max_pairs_per_prompt=10))
    assert pairs_of(pairs) == [("Answer: A", "Answer: B", 2.0, 1.0)]
    # "  " over A and over B (empty chosen), A and B over "" (empty rejected)
    assert stats.pairs_dropped["empty_response"] == 4
    assert stats.pairs_dropped["identical_text"] == 1  # "  " vs ""


def test_length_ratio_guard():
    scored = [roll(0, "long", 2.0, tokens=300), roll(1, "short", 1.0, tokens=100)]
    pairs, stats = build_pairs([prompt()], scored, PairsConfig(max_length_ratio=2.0))
    assert pairs == [] and dropped(stats) == {"length_ratio": 1}
    assert stats.pairs_dropped["length_ratio"] == 1
    pairs, _ = build_pairs([prompt()], scored, PairsConfig(max_length_ratio=3.0))  # exactly 3x: kept
    assert pairs_of(pairs) == [("long", "short", 2.0, 1.0)]
    # a longer rejected never trips the guard
    pairs, _ = build_pairs([prompt()], [roll(0, "s", 2.0, tokens=1), roll(1, "l", 1.0, tokens=900)],
                           PairsConfig(max_length_ratio=1.0))
    assert len(pairs) == 1


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_reward_is_an_error(bad):
    scored = [roll(0, "a", 1.0), roll(7, "b", bad)]
    with pytest.raises(ValueError, match=r"prompt_id='p1' sample_idx=7: reward .* not a finite number"):
        build_pairs([prompt()], scored, PairsConfig())


def test_unknown_prompt_and_repeated_sample_are_errors():
    with pytest.raises(ValueError, match="prompt_id='zz' sample_idx=0: no such prompt"):
        build_pairs([prompt()], [roll(0, "a", 1.0, pid="zz")])
    with pytest.raises(ValueError, match="sample_idx=0: sample appears twice"):
        build_pairs([prompt()], [roll(0, "a", 1.0), roll(0, "b", 2.0)])


def test_never_chosen_equals_rejected_on_random_groups():
    """OpenRLHF's best-vs-worst emits chosen == rejected on ties; none of ours ever does."""
    rng = random.Random(0)
    texts = ["Answer: A", "Answer: B", "Answer: C", "", "The answer is D."]
    prompts = [prompt(f"p{i}", rng.choice("ABCD")) for i in range(200)]
    scored = [roll(j, rng.choice(texts), float(rng.randint(0, 3)), pid=p.prompt_id)
              for p in prompts for j in range(rng.randint(1, 6))]
    for strategy in ["best_vs_worst", "top_k", "rule_first"]:
        pairs, stats = build_pairs(prompts, scored, PairsConfig(strategy=strategy, max_pairs_per_prompt=4))
        assert pairs and stats.pairs_kept == len(pairs)
        assert sum(stats.prompts_dropped.values()) + stats.prompts_with_pairs == len(prompts)
        for p in pairs:
            assert p.chosen.strip() != p.rejected.strip() and p.chosen.strip()
            if strategy != "rule_first":
                assert p.chosen_reward > p.rejected_reward


# ------------------------------------------------------------------------------- rule_first

# answer: 1 = correct. The highest reward (5.0) is wrong, so the reward alone would pick it.
RULED = [roll(0, "a", 5.0, answer=0), roll(1, "b", 1.0, answer=1), roll(2, "c", 3.0, answer=1),
         roll(3, "d", -1.0, answer=0)]


def test_rule_first_with_precomputed_scores():
    pairs, _ = build_pairs([prompt()], RULED, PairsConfig(strategy="rule_first"))
    assert pairs_of(pairs) == [("c", "d", 3.0, -1.0)]  # best correct vs worst incorrect
    # k=3: c>d 4, b>d 2, c>a -2 (kept: correctness decides), b>a -4 capped
    pairs, stats = build_pairs([prompt()], RULED, PairsConfig(strategy="rule_first", max_pairs_per_prompt=3))
    assert pairs_of(pairs) == [("c", "d", 3.0, -1.0), ("b", "d", 1.0, -1.0), ("c", "a", 3.0, 5.0)]
    assert stats.pairs_capped == 1 and stats.margin_min == -2.0


def test_rule_first_min_margin_applies_only_when_asked():
    config = PairsConfig(strategy="rule_first", max_pairs_per_prompt=4, min_margin=3.0)
    pairs, _ = build_pairs([prompt()], RULED, config)
    assert len(pairs) == 4
    config.rule_apply_margin = True
    pairs, stats = build_pairs([prompt()], RULED, config)
    assert pairs_of(pairs) == [("c", "d", 3.0, -1.0)]
    assert stats.pairs_dropped["below_margin"] == 3


GEO = ["In triangle ABC the angle is 40 degrees, so the answer is D.", "Answer: B", "\\boxed{C}",
       "x = 12, hence \\boxed{D}", "The answer is (d)."]


def test_rule_first_extracts_answers_when_no_rule_scores():
    scored = [roll(i, t, r) for i, (t, r) in enumerate(zip(GEO, [0.5, 4.0, 2.0, 1.0, -3.0]))]
    config = PairsConfig(strategy="rule_first", max_pairs_per_prompt=2)
    pairs, _ = build_pairs([prompt(answer="D")], scored, config)
    # correct: 0 (0.5), 3 (1.0), 4 (-3.0); incorrect: 1 (4.0), 2 (2.0)
    assert pairs_of(pairs) == [(GEO[3], GEO[2], 1.0, 2.0), (GEO[0], GEO[2], 0.5, 2.0)]


def test_rule_first_missing_classes_and_fallback():
    prompts = [prompt("all_right", "A"), prompt("all_wrong", "A"), prompt("no_truth")]
    scored = [roll(0, "Answer: A", 2.0, "all_right"), roll(1, "The answer is A.", 1.0, "all_right"),
              roll(0, "Answer: B", 2.0, "all_wrong"), roll(1, "Answer: C", 0.0, "all_wrong"),
              roll(0, "Answer: B", 2.0, "no_truth"), roll(1, "Answer: C", 2.0, "no_truth")]
    pairs, stats = build_pairs(prompts, scored, PairsConfig(strategy="rule_first"))
    assert pairs == []
    assert dropped(stats) == {"no_incorrect": 1, "no_correct": 1, "no_ground_truth": 1}
    pairs, stats = build_pairs(prompts, scored, PairsConfig(strategy="rule_first", rule_fallback="reward",
                                                            min_margin=1.5))
    # all_right: margin 1 < 1.5; all_wrong: B>C by 2; no_truth: tied
    assert [(p.prompt_id, p.chosen, p.rejected) for p in pairs] == [("all_wrong", "Answer: B", "Answer: C")]
    assert stats.fallback_prompts == 1
    assert dropped(stats) == {"no_incorrect": 1, "no_ground_truth": 1}


def test_rule_score_must_be_zero_or_one():
    with pytest.raises(ValueError, match=r"sample_idx=1: rule_scores\['answer'\] must be 0 or 1"):
        build_pairs([prompt()], [roll(0, "a", 1.0, answer=1), roll(1, "b", 0.0, answer=0.5)],
                    PairsConfig(strategy="rule_first"))


@pytest.mark.parametrize("response, expected", [
    ("The answer is D.", "d"),
    ("Answer: B", "b"),
    ("\\boxed{C}", "c"),
    ("So $x = \\boxed{\\frac{3}{2}}$.", "\\frac{3}{2}"),
    ("The answer is 12.5.", "12.5"),
    ("Answer: **(A)**", "a"),
    ("First the answer is A. On reflection, the final answer is B. Done.", "b"),
    ("Final Answer: The final answer is C. I hope it is correct.", "c"),
    ("Answer:\nB", "b"),
    ("Comparing the options, the best choice is C", "c"),
    ("Solving gives x equals 7.", "7"),
    ("I am not sure.", None),
    ("", None),
])
def test_the_rule_check_finds_the_final_answer(response, expected):
    # rule_first's check is mpo.eval.extract.answer_matches (extraction pinned in test_eval_extract.py)
    if expected is None:
        assert not answer_matches(response, "A") and not answer_matches(response, "7")
    else:
        assert answer_matches(response, expected) and answer_matches(response, expected.upper())


@pytest.mark.parametrize("response, truth, correct", [
    ("The answer is D.", "D", True),
    ("the answer is d", "D", True),
    ("Answer: B", "D", False),
    ("The answer is D. 12 degrees", "D", True),
    ("Answer: (D) 12", "D", True),
    ("\\boxed{12.50}", "12.5", True),
    ("The answer is 3", "3.0", True),
    ("The answer is 4", "3", False),
    ("So the answer is x = 12.5 degrees.", "12.5", True),
    ("The answer is 1,200 cm", "1200", True),
    ("The answer is 12.5 + y", "12.5", False),
    ("", "A", False),
])
def test_answer_is_correct(response, truth, correct):
    assert answer_matches(response, truth) is correct


# --------------------------------------------------------------------------- stats and files


def test_margin_histogram():
    assert margin_histogram([0, 1, 2, 3, 4], bins=4) == {"edges": [0, 1, 2, 3, 4], "counts": [1, 1, 1, 2]}
    assert margin_histogram([-1, 0, 1, 2, 4, 5], edges=[0, 2, 4]) == {"edges": [0, 2, 4], "counts": [2, 2],
                                                                     "outside": 2}
    assert margin_histogram([3.0, 3.0], bins=2) == {"edges": [2.5, 3.0, 3.5], "counts": [0, 2]}
    assert margin_histogram([]) == {"edges": [], "counts": []}
    with pytest.raises(ValueError, match="increasing"):
        margin_histogram([1.0], edges=[1, 1])


def test_histogram_of_kept_pairs():
    prompts = [prompt(f"p{i}") for i in range(4)]
    scored = [s for i, m in enumerate([1.0, 2.0, 2.0, 5.0])
              for s in (roll(0, "good", m, pid=f"p{i}"), roll(1, "bad", 0.0, pid=f"p{i}"))]
    _, stats = build_pairs(prompts, scored, PairsConfig(), histogram_bins=4)
    assert stats.margin_histogram == {"edges": [1.0, 2.0, 3.0, 4.0, 5.0], "counts": [1, 2, 0, 1]}
    assert (stats.margin_min, stats.margin_mean, stats.margin_max) == (1.0, 2.5, 5.0)
    _, stats = build_pairs(prompts, scored, PairsConfig(), histogram_edges=[0, 2.5, 10])
    assert stats.margin_histogram == {"edges": [0.0, 2.5, 10.0], "counts": [3, 1]}


def test_pair_stats_json_round_trip(tmp_path):
    _, stats = build_pairs([prompt()], GROUP, PairsConfig(strategy="top_k", max_pairs_per_prompt=2))
    path = write_pair_stats(tmp_path, stats)
    assert path == tmp_path / "pair_stats.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pair_stats.json"]  # no temp file left
    on_disk = json.loads(path.read_text())
    assert on_disk == stats.to_json()
    assert set(on_disk["prompts_dropped"]) == set(PROMPT_REASONS)
    assert set(on_disk["pairs_dropped"]) == set(PAIR_REASONS)
    assert read_pair_stats(path) == stats == PairStats.from_json(on_disk)
    assert write_pair_stats(tmp_path / "sub" / "stats.json", stats).is_file()


def test_shuffled_input_gives_the_same_pairs():
    rng = random.Random(1)
    prompts = [prompt(f"p{i}", rng.choice("AB")) for i in range(30)]
    scored = [roll(j, f"Answer: {rng.choice('AB')} ({j})", round(rng.gauss(0, 2), 1), pid=p.prompt_id,
                   tokens=rng.randint(1, 50)) for p in prompts for j in range(6)]
    for strategy in ["best_vs_worst", "top_k", "rule_first"]:
        config = PairsConfig(strategy=strategy, max_pairs_per_prompt=3, min_margin=0.5, max_length_ratio=4)
        expected, expected_stats = build_pairs(prompts, scored, config)
        assert expected
        for _ in range(3):
            shuffled = scored[:]
            rng.shuffle(shuffled)
            pairs, stats = build_pairs({p.prompt_id: p for p in prompts}, shuffled, config)
            assert pairs == expected and stats == expected_stats
        # output follows the order of the prompts given
        reversed_ids = list(dict.fromkeys(p.prompt_id for p in build_pairs(prompts[::-1], scored, config)[0]))
        assert reversed_ids == list(dict.fromkeys(p.prompt_id for p in expected))[::-1]
