"""reward/scorer.py on a tiny reward model: scores independent of batching, padding and order; the
batch plan; and every bad input the scorer promises to name (missing image, empty response,
non-finite score, over-long item under both policies, image count mismatch)."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from mpo.errors import MpoError
from reward.model import RewardModel
from reward.scorer import ScoreError, Scorer, plan_batches

TOL = 1e-5


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("scorer_images")
    rng = random.Random(1)
    paths = []
    for i in range(5):
        path = folder / f"pic_{i}.png"
        Image.new("RGB", (rng.randint(30, 240), rng.randint(30, 240)), (40 * i, 200 - 30 * i, 90)).save(path)
        paths.append(str(path))
    return paths


def user(images: int, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def items(images) -> list[dict]:
    """20 items: one, two or no images; several responses per prompt (shared prompts); varied lengths."""
    rng = random.Random(2)
    out = []
    for p in range(8):
        count = p % 3
        prompt = user(count, "What colour is it? " * (1 + p % 3))
        chosen = rng.sample(images, count)
        for r in range(1 + p % 3):
            response = " ".join(
                rng.choice(["red", "blue", "the", "square", "is", "so"]) for _ in range(2 + 9 * r + p)
            )
            out.append({"messages": prompt, "images": chosen, "response": response})
    return out


@pytest.fixture(scope="module")
def model(tiny_reward_dir) -> RewardModel:
    return RewardModel.from_pretrained(tiny_reward_dir)


@pytest.fixture
def scorer(model, tiny_processor):
    return Scorer.from_model(model, tiny_processor, progress=False)


@pytest.fixture(scope="module")
def baseline(model, tiny_processor, items) -> list[float]:
    """Every item on its own, prompt and response in one forward: batch size 1, no padding."""
    return Scorer.from_model(
        model, tiny_processor, max_batch_size=1, share_prompts=False, progress=False
    ).score(items)


def close(a, b) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= TOL for x, y in zip(a, b))


@pytest.mark.parametrize(
    "options",
    [
        {"max_batch_size": 3},
        {"max_batch_size": 8},
        {"max_batch_size": 64},
        {"max_batch_size": 64, "padding_side": "left"},
        {"max_batch_size": 5, "padding_side": "left"},
        {"token_budget": 200},
        {"token_budget": 1},
        {"max_batch_size": 64, "share_prompts": False},
        {"max_batch_size": 5, "share_prompts": False, "padding_side": "left"},
    ],
    ids=str,
)
def test_scores_do_not_depend_on_batching_or_padding(model, tiny_processor, items, baseline, options):
    assert len(set(baseline)) > 10
    scorer = Scorer.from_model(model, tiny_processor, progress=False, **options)
    assert close(scorer.score(items), baseline)


def test_scores_do_not_depend_on_order(scorer, items, baseline):
    order = list(range(len(items)))
    random.Random(5).shuffle(order)
    scores = scorer.score([items[i] for i in order])
    assert close(scores, [baseline[i] for i in order])


def test_images_as_pil_or_bytes_score_like_paths(scorer, items, baseline):
    index = next(i for i, item in enumerate(items) if len(item["images"]) == 2)
    item = items[index]
    as_pil = {**item, "images": [Image.open(p) for p in item["images"]]}
    as_bytes = {**item, "images": [{"bytes": Path(p).read_bytes(), "path": p} for p in item["images"]]}
    assert close(scorer.score([as_pil, as_bytes]), [baseline[index]] * 2)


def test_shared_prompts_run_once_each(model, tiny_processor, items, baseline, monkeypatch):
    """With shared prompts, each distinct prompt goes through the model once (its responses reuse
    its cached keys and values), and the scores are the one-at-a-time scores."""
    import reward.scorer

    seen = []
    run_prompts = reward.scorer.run_prompts
    monkeypatch.setattr(
        reward.scorer,
        "run_prompts",
        lambda model, prompts, *a: seen.extend(prompts) or run_prompts(model, prompts, *a),
    )
    scorer = Scorer.from_model(model, tiny_processor, progress=False)
    result = scorer.score_all(items)
    distinct = {(str(i["messages"]), tuple(i["images"])) for i in items}
    assert len(seen) == len({id(p) for p in seen}) == len(distinct) == 5 < len(items)
    assert close(result.scores, baseline)


def test_plan_batches_orders_by_sort_keys_within_the_budget():
    lengths, keys = [100, 30, 90, 40], [1, 9, 2, 8]  # 2 x 40 fits 200; 3 x 90 does not; 2 x 100 does
    assert plan_batches(lengths, token_budget=200, max_batch_size=8, sort_keys=keys) == [[1, 3], [2, 0]]


def test_plan_batches_respects_budget_and_size():
    lengths = [random.Random(0).randint(5, 300) for _ in range(100)]
    batches = plan_batches(lengths, token_budget=1000, max_batch_size=6)
    assert sorted(i for b in batches for i in b) == list(range(100))
    for batch in batches:
        assert len(batch) <= 6
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 1000
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat, reverse=True)  # longest first: an out-of-memory shows at once
    assert plan_batches([50, 400, 10], token_budget=100, max_batch_size=8) == [[1], [0, 2]]


def test_pixel_bounds_override_the_processor(tiny_reward_dir, tmp_path):
    big = tmp_path / "big.png"
    Image.new("RGB", (224, 224), "red").save(big)
    scorer = Scorer(tiny_reward_dir, min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28, progress=False).load()
    size = scorer.processor.image_processor.size
    assert (size.shortest_edge, size.longest_edge) == (4 * 28 * 28, 16 * 28 * 28)
    encoded = scorer.encode([{"messages": user(1, "q"), "images": [str(big)], "response": "a"}])[0]
    assert encoded.input_ids.count(scorer.image_token_id) == 16  # 64 without the cap
    capped = (
        Scorer(tiny_reward_dir, max_pixels=8 * 28 * 28, progress=False).load().processor.image_processor.size
    )
    assert (capped.shortest_edge, capped.longest_edge) == (
        4 * 28 * 28,
        8 * 28 * 28,
    )  # floor kept from the folder
    with pytest.raises(MpoError, match="min_pixels 50176 exceeds max_pixels 3136"):
        Scorer(tiny_reward_dir, min_pixels=64 * 28 * 28, max_pixels=4 * 28 * 28).load()


# ---------------------------------------------------------------- bad input


def test_missing_image_is_named_before_the_model_loads(tiny_reward_dir, tmp_path):
    scorer = Scorer(tiny_reward_dir, progress=False)
    item = {
        "messages": user(1, "q"),
        "images": [str(tmp_path / "gone.png")],
        "response": "a",
        "where": "in.jsonl:7",
    }
    with pytest.raises(ScoreError, match=r"in\.jsonl:7: field 'images': image not found: .*gone\.png"):
        scorer.score([item])
    assert scorer.model is None


def test_unreadable_image_is_named(scorer, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ScoreError, match=r"item 0: field 'images': image unreadable: .*bad\.png"):
        scorer.score([{"messages": user(1, "q"), "images": [str(bad)], "response": "a"}])


def test_empty_response_is_an_error_unless_allowed(model, tiny_processor, scorer):
    item = {"messages": user(0, "q"), "images": [], "response": "  "}
    with pytest.raises(ScoreError, match=r"item 1: empty response"):
        scorer.score([{**item, "response": "fine"}, item])
    allowed = Scorer.from_model(model, tiny_processor, allow_empty=True, progress=False)
    assert torch.isfinite(torch.tensor(allowed.score([item]))).all()


def test_image_count_mismatch_is_named(scorer, images):
    with pytest.raises(ScoreError, match=r"item 0: conversation has 2 image part\(s\) but 1 image"):
        scorer.score([{"messages": user(2, "q"), "images": images[:1], "response": "a"}])


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_score_is_named(tiny_reward_dir, tiny_processor, value):
    broken = RewardModel.from_pretrained(tiny_reward_dir)
    with torch.no_grad():
        broken.v_head.summary.weight.fill_(value)
        broken.v_head.summary.bias.fill_(value)
    scorer = Scorer.from_model(broken, tiny_processor, progress=False)
    item = {"messages": user(0, "q"), "images": [], "response": "a", "where": "rows.jsonl:3"}
    with pytest.raises(ScoreError, match=r"rows\.jsonl:3: non-finite score"):
        scorer.score([item])


def test_too_long_is_an_error_by_default(model, tiny_processor, items):
    lengths = [
        len(e.input_ids) for e in Scorer.from_model(model, tiny_processor, progress=False).encode(items)
    ]
    limit = sorted(lengths)[-3]
    first = next(i for i, n in enumerate(lengths) if n > limit)
    scorer = Scorer.from_model(model, tiny_processor, max_length=limit, progress=False)
    with pytest.raises(
        ScoreError, match=rf"item {first}: {lengths[first]} tokens .*exceeds max_length {limit}"
    ):
        scorer.score(items)


def test_too_long_items_are_skipped_and_counted(model, tiny_processor, items, baseline):
    lengths = [
        len(e.input_ids) for e in Scorer.from_model(model, tiny_processor, progress=False).encode(items)
    ]
    limit = sorted(lengths)[-4]
    long = sorted(i for i, n in enumerate(lengths) if n > limit)
    assert 1 <= len(long) <= 3
    scorer = Scorer.from_model(model, tiny_processor, max_length=limit, on_too_long="skip", progress=False)
    result = scorer.score_all(items)
    assert [s.index for s in result.skipped] == long
    assert all(s.num_tokens == lengths[s.index] and s.where == f"item {s.index}" for s in result.skipped)
    assert [i for i, s in enumerate(result.scores) if s is None] == long
    kept = [i for i in range(len(items)) if i not in long]
    assert close([result.scores[i] for i in kept], [baseline[i] for i in kept])
    with pytest.raises(ScoreError, match=rf"item {long[0]}: {lengths[long[0]]} tokens .*exceeds max_length"):
        scorer.score(items)  # score() owes one score per item, so it never skips


def test_bad_options_and_folders_are_errors(tiny_reward_dir, tmp_path):
    with pytest.raises(ScoreError, match="on_too_long"):
        Scorer(tiny_reward_dir, on_too_long="truncate")
    with pytest.raises(ScoreError, match="dtype"):
        Scorer(tiny_reward_dir, dtype="int8")
    with pytest.raises(ScoreError, match="token_budget"):
        Scorer(tiny_reward_dir, token_budget=0)
    with pytest.raises(MpoError, match=r"nowhere: no such folder"):
        Scorer(tmp_path / "nowhere")


def test_bytes_image_that_is_not_an_image_is_named(scorer):
    item = {
        "messages": user(1, "q"),
        "images": [{"bytes": io.BytesIO(b"xx").getvalue(), "path": "a.jpg"}],
        "response": "a",
    }
    with pytest.raises(ScoreError, match=r"item 0: embedded image 'a\.jpg' unreadable"):
        scorer.score([item])


# ---------------------------------------------------------------- records, options, one check per folder


def test_records_score_as_their_plain_items_do(scorer, items):
    from mpo.records import PreferencePair, Prompt, Rollout
    from reward.items import ScoreItem, pair_items, rollout_items

    records = [ScoreItem(Prompt(str(n), i["messages"], i["images"]), i["response"]) for n, i in enumerate(items)]
    assert scorer.score(records) == scorer.score(items)
    prompts = {"p": Prompt("p", items[1]["messages"], items[1]["images"])}
    rollouts = [Rollout("p", n, items[n]["response"], 3, "stop", "pi") for n in (1, 2)]
    assert [i.where for i in rollout_items(prompts, rollouts)] == ["p#1", "p#2"]
    assert scorer.score(rollout_items(prompts, rollouts)) == scorer.score([{**items[1], "response": r.response}
                                                                           for r in rollouts])
    pair = PreferencePair("p", items[1]["messages"], items[1]["images"], items[1]["response"], items[2]["response"])
    assert scorer.score(pair_items(pair)) == scorer.score(rollout_items(prompts, rollouts))


def test_options_are_one_checked_record(tiny_reward_dir):
    from reward.scorer import ScoreOptions

    options = ScoreOptions(token_budget=512, progress=False)
    scorer = Scorer(tiny_reward_dir, options, max_batch_size=4)
    assert (scorer.options.token_budget, scorer.options.max_batch_size, options.max_batch_size) == (512, 4, 64)
    with pytest.raises(ScoreError, match="on_too_long must be one of error, skip"):
        ScoreOptions(on_too_long="truncate")
    with pytest.raises(TypeError, match="unknown option"):
        Scorer(tiny_reward_dir, batch=3)


def test_a_reward_folder_is_checked_once_per_process(tiny_reward_dir, monkeypatch):
    import mpo.models

    monkeypatch.setattr(mpo.models, "_CHECKED", {})
    read = []
    shapes = mpo.models.safetensors_shapes
    monkeypatch.setattr(mpo.models, "safetensors_shapes", lambda file, key: read.append(file.name) or shapes(file, key))
    mpo.models.model_folder(tiny_reward_dir, "model.reward_model", reward=True)  # the command's own check
    Scorer(tiny_reward_dir, progress=False).load()  # the scorer's and the weights' checks find it done
    assert sorted(read) == sorted(p.name for p in Path(tiny_reward_dir).glob("*.safetensors"))


def test_each_image_is_opened_once_per_call(scorer, items, monkeypatch):
    import mpo.data.images

    opened = []
    real = mpo.data.images._opened
    monkeypatch.setattr(mpo.data.images, "_opened", lambda path, name=None: opened.append(str(path)) or real(path, name))
    scorer.score(items)
    assert sorted(opened) == sorted({image for item in items for image in item["images"]})
