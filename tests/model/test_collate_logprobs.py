"""Pair collation and single-vision-encode log-probs on a tiny Qwen2.5-VL (CPU, fp32).

The log-prob tests pin :func:`mpo.train.logprobs.pair_logps` (images encoded once per pair, features
reused for the rejected row, M-RoPE positions from ``get_rope_index``, logits only at response
positions) to the naive computation: a full model forward on each sequence alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mpo.chat import ChatEncoder
from mpo.data import load_preferences
from mpo.records import PreferencePair
from mpo.train.collate import PairCollator, PairDataset, PairError, check_pairs, pad_token_id
from mpo.train.logprobs import naive_sequence_logps, pair_logps

PAIRS = Path(__file__).resolve().parent.parent / "fixtures" / "pairs" / "colour_pairs.jsonl"


@pytest.fixture(scope="module")
def model(tiny_policy_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_policy_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def pairs():
    return load_preferences(PAIRS).records


@pytest.fixture(scope="module")
def dataset(pairs, tiny_processor):
    return PairDataset(pairs, ChatEncoder(tiny_processor), max_length=512)


def _naive(model, items):
    """[2B] sums and per-row per-token log-probs from one full forward per sequence."""
    sums, tokens = [], []
    for key in ("chosen_ids", "rejected_ids"):
        for it in items:
            vision = {k: it[k] for k in ("pixel_values", "image_grid_thw") if k in it}
            ids = it["prompt_ids"] + it[key]
            start = len(it["prompt_ids"])
            sums.append(naive_sequence_logps(model, ids, start, vision))
            logits = model(input_ids=torch.tensor([ids]), **_types(model, ids, vision)).logits[0, :-1]
            tokens.append(
                torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[start - 1 :, 0]
            )
    return torch.stack(sums), tokens


def _types(model, ids, vision):
    if not vision:
        return {}
    return {**vision, "mm_token_type_ids": (torch.tensor([ids]) == model.config.image_token_id).long()}


@pytest.fixture(params=["mask", "columns"])
def keep_mode(request, monkeypatch):
    """Both ways of keeping only response logits: a boolean mask (transformers 5.2x) and the
    union of columns (5.19); on 5.19 the mask mode is skipped."""
    import mpo.train.logprobs

    if request.param == "mask" and not mpo.train.logprobs._accepts_mask_keep():
        pytest.skip("this transformers has no boolean logits_to_keep")
    monkeypatch.setattr(mpo.train.logprobs, "_MASK_KEEP", request.param == "mask")
    return request.param


@torch.no_grad()
def test_single_encode_logps_equal_two_pass_forward(model, dataset, tiny_processor, keep_mode):
    items = [dataset[i] for i in (0, 13, 5, 14, 7)]  # images and text-only pairs mixed, ragged lengths
    batch = PairCollator(pad_token_id(tiny_processor))(items)
    out = pair_logps(model, batch)
    naive_sums, naive_tokens = _naive(model, items)
    torch.testing.assert_close(out.sums, naive_sums, rtol=1e-5, atol=1e-5)
    for row, expected in enumerate(naive_tokens):
        got = out.token_logps[row][out.response_mask[row]]
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert torch.equal(out.chosen, out.sums[:5]) and torch.equal(out.rejected, out.sums[5:])


def test_vision_tower_runs_once_per_pair(model, dataset, tiny_processor):
    items = [dataset[i] for i in (0, 1, 12)]  # two image pairs, one text-only
    batch = PairCollator(pad_token_id(tiny_processor))(items)
    assert (
        batch["pixel_values"].shape[0]
        == items[0]["pixel_values"].shape[0] + items[1]["pixel_values"].shape[0]
    )
    calls = []
    handle = model.model.visual.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        with torch.no_grad():
            pair_logps(model, batch)
    finally:
        handle.remove()
    assert calls == [batch["pixel_values"].shape[0]]


@torch.no_grad()
def test_token_id_zero_counts_like_any_other(model, dataset, tiny_processor):
    pad = pad_token_id(tiny_processor)
    assert pad == 0  # the tiny tokenizer pads with id 0: a position mask, never an id test, must decide
    item = dict(dataset[0])
    item["chosen_ids"] = [0, item["chosen_ids"][0], 0] + item["chosen_ids"][1:]
    batch = PairCollator(pad)([item])
    out = pair_logps(model, batch)
    start = len(item["prompt_ids"])
    assert out.response_mask[0, start : start + 3].all()
    assert (out.token_logps[0, [start, start + 2]] < 0).all()
    vision = {k: item[k] for k in ("pixel_values", "image_grid_thw")}
    expected = naive_sequence_logps(model, item["prompt_ids"] + item["chosen_ids"], start, vision)
    torch.testing.assert_close(out.chosen[0], expected, rtol=1e-5, atol=1e-5)


def test_collator_layout(dataset, tiny_processor):
    items = [dataset[i] for i in (0, 12)]
    batch = PairCollator(pad_token_id(tiny_processor))(items)
    assert batch["input_ids"].shape[0] == 4
    for row, (it, key) in enumerate(
        [
            (items[0], "chosen_ids"),
            (items[1], "chosen_ids"),
            (items[0], "rejected_ids"),
            (items[1], "rejected_ids"),
        ]
    ):
        n = len(it["prompt_ids"]) + len(it[key])
        assert batch["input_ids"][row, :n].tolist() == it["prompt_ids"] + it[key]
        assert batch["attention_mask"][row].sum() == n
        assert batch["response_mask"][row].nonzero().flatten().tolist() == list(
            range(len(it["prompt_ids"]), n)
        )
    assert batch["image_grid_thw"].shape[0] == 1  # only the image pair's one image, not repeated


def _bad(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _row(**kw):
    base = {
        "prompt_id": "p",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi?"}]}],
        "images": [],
        "chosen": "a",
        "rejected": "b",
    }
    return {**base, **kw}


@pytest.mark.parametrize(
    "row, message",
    [
        (_row(prompt_id="e1", chosen="  "), "field 'chosen' is empty"),
        (_row(prompt_id="e2", rejected=""), "field 'rejected' is empty"),
        (_row(prompt_id="same", chosen="yes", rejected="yes"), "chosen and rejected are the same response"),
    ],
)
def test_bad_pairs_named_with_file_and_line(tmp_path, tiny_processor, row, message):

    path = _bad(tmp_path, [_row(prompt_id="ok"), row])
    loaded = load_preferences(path)
    with pytest.raises(PairError) as err:
        PairDataset(loaded.records, ChatEncoder(tiny_processor), 512, wheres=loaded.sources)
    assert f"{path}:2 (prompt_id {row['prompt_id']!r}): {message}" in str(err.value)


def test_missing_image_named(tmp_path):
    pair = PreferencePair(
        "img", [{"role": "user", "content": [{"type": "image"}]}], [str(tmp_path / "gone.png")], "a", "b"
    )
    with pytest.raises(PairError, match=r"x.jsonl:7 \(prompt_id 'img'\): image not found: .*gone.png"):
        check_pairs([pair], ["x.jsonl:7"])
    loaded_error = _bad(
        tmp_path, [{**_row(prompt_id="img"), "messages": pair.messages, "images": ["gone.png"]}]
    )
    from mpo.data import DataError

    with pytest.raises(DataError, match=r"pairs.jsonl:1: field 'images': image not found"):
        load_preferences(loaded_error)


def test_length_policy(pairs, tiny_processor):
    encoder = ChatEncoder(tiny_processor)
    image_pair = pairs[0]
    full = encoder.encode_pair(image_pair.messages, image_pair.images, image_pair.chosen, image_pair.rejected)
    prompt = len(full.prompt_ids)
    limit = prompt + 3
    truncated = PairDataset([image_pair], encoder, limit, "truncate")
    item = truncated[0]
    assert item["prompt_ids"] == full.prompt_ids  # prompt and image tokens intact
    assert item["chosen_ids"] == full.chosen_ids[:3] and item["rejected_ids"] == full.rejected_ids[:3]
    assert truncated.report.truncated == 1 and truncated.report.kept == 1
    assert "responses truncated to 3 tokens" in truncated.report.messages[0]

    mixed = PairDataset([image_pair, pairs[12]], encoder, limit, "skip")
    assert (mixed.report.kept, mixed.report.skipped) == (1, 1)
    assert "skipped" in mixed.report.messages[0] and "'red-0'" in mixed.report.messages[0]

    with pytest.raises(PairError, match=r"pair 'red-0'.*> max_length .*on_too_long=error"):
        PairDataset([image_pair, pairs[12]], encoder, limit, "error")

    no_room = PairDataset([image_pair, pairs[12]], encoder, prompt, "truncate")
    assert (no_room.report.kept, no_room.report.skipped) == (1, 1)
    assert "prompts are never truncated" in no_room.report.messages[0]


def test_cached_and_reencoded_items_are_identical(pairs, tiny_processor, monkeypatch):
    import mpo.train.collate

    cached = PairDataset(pairs, ChatEncoder(tiny_processor), 512)
    monkeypatch.setattr(mpo.train.collate, "TOKEN_CACHE_LIMIT", 0)
    fresh = PairDataset(pairs, ChatEncoder(tiny_processor), 512)
    assert all(p.ids is not None for p in cached.plans) and all(p.ids is None for p in fresh.plans)
    for i in (0, 5, 12):
        a, b = cached[i], fresh[i]
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key], key
