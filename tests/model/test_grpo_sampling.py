"""GRPO's per-row sampling inputs (mpo.grpo.sampling.row_inputs): a batch's prompt ids and multimodal
fields cut per row equal what the processor gives for that row alone (a one-image, a text-only and a
two-image prompt, on the tiny Qwen2.5-VL processor); a field that cannot be cut is a ValueError naming
it, and the trainer takes such rows (InternVL's tiles) from their own encodings; the per-row seed context leaves the caller's random stream where it was."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mpo.cli.tiny import ASSETS
from mpo.grpo.sampling import row_inputs, row_seed
from mpo.rollout.base import seeded


def _prompts():
    from PIL import Image
    from trl.data_utils import prepare_multimodal_messages

    row = json.loads((ASSETS / "demo" / "prompts.jsonl").read_text().splitlines()[0])
    image = Image.open(ASSETS / "demo" / row["images"][0]).convert("RGB")
    question = [c for c in row["messages"][-1]["content"] if c["type"] == "text"]
    shapes = [[{"type": "image"}], [], [{"type": "image"}, {"type": "image"}]]
    prompts = [prepare_multimodal_messages([{"role": "user", "content": [*s, *question]}], images=[image] * len(s))
               for s in shapes]
    return prompts, [[image] * len(s) or None for s in shapes]


def _tokenized(processor, prompts):
    out = processor.apply_chat_template(conversation=prompts, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)
    return out["input_ids"], {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask")}


def _same(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and torch.equal(a, b)
    return a == b


def test_rows_cut_from_a_batch_equal_rows_tokenized_alone(tiny_processor):
    prompts, images = _prompts()
    ids, fields = _tokenized(tiny_processor, prompts)
    assert fields["image_grid_thw"].shape[0] == 3  # three images over the three rows
    for i in range(3):
        got_ids, got_images, got = row_inputs(ids, images, fields, i)
        want_ids, want = _tokenized(tiny_processor, prompts[i:i + 1])
        assert got_ids == want_ids and got_images == [images[i]]
        assert set(got) == set(want) and all(_same(got[k], want[k]) for k in want), i
    assert "pixel_values" not in row_inputs(ids, images, fields, 1)[2]  # the text-only row


def test_a_field_that_cannot_be_cut_is_named(tiny_processor):
    prompts, images = _prompts()
    ids, fields = _tokenized(tiny_processor, prompts)
    with pytest.raises(ValueError, match="'tiles'"):
        row_inputs(ids, images, {**fields, "tiles": torch.zeros(7, 2)}, 0)


def test_row_seeds_differ_and_leave_the_callers_stream_alone():
    assert len({row_seed(0, step, i) for step in range(4) for i in range(8)}) == 32
    torch.manual_seed(5)
    plain = torch.rand(3)
    torch.manual_seed(5)
    with seeded(row_seed(0, 0, 1)):
        inside = torch.rand(3)
    with seeded(row_seed(0, 0, 1)):
        again = torch.rand(3)
    assert torch.equal(inside, again) and not torch.equal(inside, plain)
    assert torch.equal(torch.rand(3), plain)  # the caller's stream continues where it was


def test_rows_of_images_with_several_tiles_come_from_their_own_encodings():
    """InternVL crops a wide image into several tiles (how many per image is not in the batch's fields,
    so the batch cannot be cut): MpoGRPOTrainer takes each row's inputs from that row's own encoding,
    equal to the processor's for the row alone."""
    from types import SimpleNamespace

    from PIL import Image
    from trl.data_utils import prepare_multimodal_messages

    from mpo.chat import ChatEncoder
    from mpo.cli.tiny_families import build_internvl
    from mpo.grpo.trainer import MpoGRPOTrainer, prompt_fields
    from mpo.models import eos_list

    model, processor = build_internvl()
    encoder = ChatEncoder(processor, eos_list(model.generation_config.eos_token_id))
    wide, tall = Image.new("RGB", (168, 56), "red"), Image.new("RGB", (56, 112), "blue")
    images = [[wide], [tall, wide], [wide]]
    prompts = [prepare_multimodal_messages([{"role": "user", "content": [*[{"type": "image"}] * len(row),
                                                                          {"type": "text", "text": "colour?"}]}],
                                           images=row) for row in images]
    encoded = encoder.encode_prompts(prompts, images)
    ids, fields = [e.input_ids for e in encoded], prompt_fields(encoded)
    tiles = fields["pixel_values"].shape[0]
    assert tiles > 4  # several tiles per image: the batch alone cannot say whose they are
    with pytest.raises(ValueError, match="'pixel_values'"):
        row_inputs(ids, images, fields, 0)
    trainer, cut = SimpleNamespace(_encoded=encoded), 0
    for i in range(3):
        got_ids, got_images, got = MpoGRPOTrainer._row_inputs(trainer, ids, images, fields, i)
        want_ids, want = _tokenized(processor, prompts[i:i + 1])
        assert got_ids == want_ids and got_images == [images[i]] and set(got) == set(want)
        # TRL turns the processor's arrays into one tensor before generate (torch.tensor(np.array(v)))
        assert torch.equal(got["pixel_values"], torch.tensor(np.array(want["pixel_values"]))), i
        cut += got["pixel_values"].shape[0]
    assert cut == tiles  # every tile in exactly one row
