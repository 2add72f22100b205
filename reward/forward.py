"""One batch of encoded (prompt, response) rows through a reward model, in one of two ways.

``score_full``: every row is prompt + response, padded into one ``[N, T]`` forward, the way the
model card scores; each distinct prompt's images still go through the vision tower once.

``run_prompts`` + ``score_responses``: for items that share prompts (the samples of one rollout
prompt, the two answers of a benchmark row). The prompt pass runs each distinct prompt once and
keeps its keys and values (a ``DynamicCache``); response passes then run batches of responses, of
similar lengths, against their prompts' cached keys and values (the cache rows picked, and
repeated, per batch). Attention is causal, so a prompt's hidden states do not depend on what
follows it: the scores equal ``score_full``'s up to float rounding (tested to 1e-5). The response
tokens' multimodal rotary positions continue from the prompt's largest position + 1 on all three
axes, which is how Qwen2.5-VL's ``get_rope_index`` numbers text that follows an image.

Both read the value head at each row's last real token. Padding is 0 in ``mm_token_type_ids``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mpo.chat import PromptEncoding, mrope_positions, multimodal_token_types


@dataclass
class Encoded:
    """One item to score: its prompt encoding (shared by the items with the same prompt) and the
    response tokens (end-of-turn suffix included)."""

    prompt: PromptEncoding
    response_ids: list[int]

    @property
    def input_ids(self) -> list[int]:
        return self.prompt.input_ids + self.response_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt.input_ids) + len(self.response_ids)


def pad(rows: Sequence[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> ``input_ids`` and ``attention_mask`` [N, longest], padded on ``side``."""
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(0, len(row)) if side == "right" else slice(length - len(row), length)
        input_ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return input_ids, mask


def image_inputs(model, prompts: Sequence[PromptEncoding], device) -> dict:
    """``image_grid_thw`` and precomputed ``mm_encoder_outputs`` for rows with these prompts, in row
    order; each distinct prompt (object) runs through the vision tower once."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    from mpo.train.logprobs import image_features

    distinct = {id(p): p.vision for p in prompts if "pixel_values" in p.vision}
    if not distinct:
        return {}
    visions = list(distinct.values())
    pixel_values = torch.cat([v["pixel_values"] for v in visions]).to(device)
    grids = torch.cat([v["image_grid_thw"] for v in visions]).to(device)
    per_image = image_features(model.backbone, {"pixel_values": pixel_values, "image_grid_thw": grids}).pooler_output
    features, start = {}, 0
    for key, vision in distinct.items():
        count = vision["image_grid_thw"].shape[0]
        features[key] = per_image[start : start + count]
        start += count
    rows = [p for p in prompts if "pixel_values" in p.vision]
    return {
        "image_grid_thw": torch.cat([p.vision["image_grid_thw"] for p in rows]).to(device),
        "mm_encoder_outputs": {
            "image": BaseModelOutputWithPooling(pooler_output=tuple(f for p in rows for f in features[id(p)]))
        },
    }


@torch.inference_mode()
def score_full(model, rows: Sequence[Encoded], pad_id: int, side: str, device) -> torch.Tensor:
    """Scores [N] of rows padded on ``side`` into one forward."""
    input_ids, mask = pad([r.input_ids for r in rows], pad_id, side)
    config = model.config
    types = multimodal_token_types(input_ids, config.image_token_id, config.video_token_id, mask)
    inputs = {"mm_token_type_ids": types.to(device)}
    inputs.update(image_inputs(model, [r.prompt for r in rows], device))
    return model(input_ids.to(device), mask.to(device), **inputs)


@dataclass
class PromptPass:
    """Distinct prompts run once: their keys/values, padding mask [P, Lp] and, per prompt, the
    rotary position its response starts at."""

    cache: object  # transformers DynamicCache
    mask: torch.Tensor
    next_position: torch.Tensor


@torch.inference_mode()
def run_prompts(model, prompts: Sequence[PromptEncoding], pad_id: int, side: str, device) -> PromptPass:
    """The prompt pass: ``prompts`` padded on ``side`` into one forward that keeps its cache."""
    input_ids, mask = (t.to(device) for t in pad([p.input_ids for p in prompts], pad_id, side))
    vision = image_inputs(model, prompts, device)
    positions = mrope_positions(model.backbone, input_ids, mask, vision.get("image_grid_thw"))
    output = model.backbone.model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,  # given, so the model needs no mm_token_type_ids
        use_cache=True,
        **vision,
    )
    cache = getattr(output, cache_argument(type(model.backbone.model)))
    next_position = positions.masked_fill(mask[None] == 0, -1).amax(dim=(0, 2)) + 1
    return PromptPass(cache, mask, next_position)


@functools.cache
def cache_argument(model_class) -> str:
    """The name of a key/value cache, in the forward's arguments and in its output: ``cache``
    (transformers >= 5.24, where ``past_key_values`` warns that it is deprecated) or
    ``past_key_values`` (5.19)."""
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


@torch.inference_mode()
def score_responses(
    model, prompts: PromptPass, slots: Sequence[int], responses: Sequence[list[int]], pad_id: int, device
) -> torch.Tensor:
    """Scores [N] of ``responses[i]`` following prompt ``slots[i]`` of ``prompts`` (responses padded
    on the right, after the prompt's cached keys and values)."""
    from transformers import DynamicCache

    which = torch.tensor(list(slots), device=device)
    cache = DynamicCache()
    for layer, cached in enumerate(prompts.cache.layers):
        cache.update(cached.keys[which], cached.values[which], layer)
    input_ids, mask = (t.to(device) for t in pad(responses, pad_id, "right"))
    steps = torch.arange(input_ids.shape[1], device=device)
    hidden = model.backbone.model(
        input_ids=input_ids,
        attention_mask=torch.cat([prompts.mask[which], mask], dim=1),
        position_ids=(prompts.next_position[which][:, None] + steps).expand(3, -1, -1),
        use_cache=True,
        **{cache_argument(type(model.backbone.model)): cache},
    ).last_hidden_state
    last = hidden[torch.arange(len(responses), device=device), mask.sum(dim=1) - 1]
    return model.v_head(last).squeeze(-1)
