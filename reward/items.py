"""What :class:`reward.scorer.Scorer` scores: :class:`ScoreItem`, a prompt record's conversation and
images with one response, and where it came from (for messages).

Callers hand the scorer records: :func:`rollout_items` (a round's rollouts and their prompts),
:func:`pair_items` (a preference pair's two responses, chosen first). A plain object
``{"messages", "images", "response", "where"}`` is still taken (:func:`as_item` checks it field by
field, as a file's row). Images are paths, PIL images or HF ``{"bytes", "path"}`` structs; they are
opened, checked and resized once, by the scorer (:func:`mpo.data.images.fit_image`).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpo.errors import MpoError
from mpo.records import PreferencePair, Prompt, Rollout


class ScoreError(MpoError):
    """An item that cannot be scored; the message names it."""


@dataclass(frozen=True)
class ScoreItem:
    """``response`` to ``prompt`` (its messages and images); ``where`` names it in messages."""

    prompt: Prompt
    response: str
    where: str = ""

    @property
    def messages(self) -> list[dict]:
        return self.prompt.messages

    @property
    def images(self) -> list:
        return self.prompt.images


def rollout_items(prompts: Mapping[str, Prompt], rollouts: Sequence[Rollout]) -> list[ScoreItem]:
    """Each rollout as an item of its prompt (``prompts`` by id), named ``prompt_id#sample_idx``."""
    return [ScoreItem(prompts[r.prompt_id], r.response, f"{r.prompt_id}#{r.sample_idx}") for r in rollouts]


def pair_items(pair: PreferencePair, where: str = "") -> list[ScoreItem]:
    """A pair's chosen and rejected responses as two items of its prompt (``where (response 0|1)``)."""
    prompt = Prompt(pair.prompt_id, pair.messages, pair.images)
    return [ScoreItem(prompt, response, f"{where} (response {n})" if where else "")
            for n, response in enumerate((pair.chosen, pair.rejected))]


def where_of(item: ScoreItem | dict, index: int) -> str:
    where = item.where if isinstance(item, ScoreItem) else item.get("where")
    return str(where or f"item {index}")


def as_item(item: Any, index: int, allow_empty: bool = False) -> ScoreItem:
    """``item`` (a :class:`ScoreItem` or a plain object) checked: messages a non-empty list of objects,
    response a string, not empty unless ``allow_empty``, images a list. Image files are read later,
    once, when the item is encoded."""
    if isinstance(item, ScoreItem):
        fields = {"messages": item.messages, "images": item.images, "response": item.response}
    elif isinstance(item, dict):
        fields = item
    else:
        raise ScoreError(f"item {index}: expected an object with messages, images, response")
    where = where_of(item, index)
    messages = fields.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ScoreError(f"{where}: field 'messages': expected a non-empty list of objects")
    response = fields.get("response")
    if not isinstance(response, str):
        raise ScoreError(f"{where}: field 'response': expected a string, got {type(response).__name__}")
    if not allow_empty and not response.strip():
        raise ScoreError(f"{where}: empty response (pass allow_empty to score it anyway)")
    images = fields.get("images") or []
    if not isinstance(images, list):
        raise ScoreError(f"{where}: field 'images': expected a list, got {type(images).__name__}")
    if isinstance(item, ScoreItem):
        return item
    return ScoreItem(Prompt(str(index), messages, images), response, str(item.get("where") or ""))


def prompt_key(item: ScoreItem) -> tuple:
    """Items with equal keys share one prompt encoding (same messages, same images)."""
    return json.dumps(item.messages, sort_keys=True, default=str), tuple(map(_image_key, item.images or []))


def _image_key(image: Any) -> Any:
    if isinstance(image, (str, Path)):
        return ("path", str(image))
    if isinstance(image, dict) and image.get("bytes") is not None:
        return ("bytes", hashlib.sha256(image["bytes"]).digest())
    return ("object", id(image))


def fitted(image: Any, image_processor, where: str):
    """One image of an item opened, checked and resized (:func:`mpo.data.images.fit_image`, once);
    a bad one is a :class:`ScoreError` naming the item."""
    from PIL import Image

    from mpo.data.images import ImageError, fit_image

    if isinstance(image, (str, Path)):
        try:
            return fit_image(image, image_processor)
        except ImageError as err:
            raise ScoreError(f"{where}: field 'images': {err}") from None
    if isinstance(image, dict) and image.get("bytes") is not None:
        try:
            return fit_image(io.BytesIO(image["bytes"]), image_processor)
        except ImageError as err:
            if str(err).startswith("image too thin"):
                raise ScoreError(f"{where}: {err}") from None
            detail = str(err).split(" (", 1)[-1].rstrip(")")
            raise ScoreError(f"{where}: embedded image {image.get('path')!r} unreadable ({detail})") from None
    if isinstance(image, Image.Image):
        try:
            return fit_image(image, image_processor)
        except ImageError as err:
            raise ScoreError(f"{where}: {err}") from None
    raise ScoreError(
        f"{where}: image: expected a path, a PIL image or {{bytes, path}}, got {type(image).__name__}"
    )
