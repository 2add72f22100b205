"""The one place where a conversation becomes model inputs.

Rollout (prompt alone), reward scoring (prompt + response) and training (prompt + chosen /
rejected) all encode through :class:`ChatEncoder`, so the prompt tokens are the same in all three.

How a conversation is encoded:

- The prompt is the chat template rendered with ``add_generation_prompt=True`` (for Qwen: the
  default system turn, the user turn, then ``<|im_start|>assistant\\n``) and tokenized by the
  processor, which expands each ``<|image_pad|>`` into one token per merged image patch and returns
  ``pixel_values`` / ``image_grid_thw``.
- A response is tokenized on its own, followed by the template's end-of-turn suffix (for Qwen
  ``<|im_end|>\\n``), and appended to the prompt ids. ``response_start`` is the index of its first
  token. The suffix is read off the template itself (render a turn around a sentinel), so the full
  sequence is the template's rendering of ``[user, assistant]`` with ``add_generation_prompt=False``,
  whose last token is what the Skywork-VL reward model scores.
- Tokenizing the response apart from the prompt is what keeps the prompt tokens identical across
  uses. It differs from tokenizing the whole rendered text only where BPE would merge across the
  boundary (a response that starts with a newline after ``assistant\\n``); that edge is accepted.

Messages are Hugging Face chat messages; each ``{"type": "image"}`` content part takes the next of
``images`` (PIL images, or paths opened here).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpo.errors import MpoError

_SENTINEL = "\u2063MPO-RESPONSE\u2063"


@dataclass
class PromptEncoding:
    input_ids: list[int]
    vision: dict[str, Any]  # pixel_values, image_grid_thw (absent for text-only prompts)


@dataclass
class ResponseEncoding:
    input_ids: list[int]  # prompt + response + end-of-turn suffix
    response_start: int
    vision: dict[str, Any]


@dataclass
class PairEncoding:
    prompt_ids: list[int]
    chosen_ids: list[int]  # response tokens only (with suffix)
    rejected_ids: list[int]
    vision: dict[str, Any]


class ChatError(MpoError):
    """A conversation that cannot be encoded (image count mismatch, bad template)."""


def count_image_parts(messages: Sequence[dict]) -> int:
    count = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            count += sum(1 for part in content if isinstance(part, dict) and part.get("type") == "image")
    return count


class ChatEncoder:
    """Encode conversations for one processor (a Qwen2.5-VL processor or a plain tokenizer)."""

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.suffix = self._response_suffix()

    def _render(self, messages: Sequence[dict], generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=generation_prompt
        )

    def _response_suffix(self) -> str:
        probe = [{"role": "user", "content": [{"type": "text", "text": "q"}]}]
        prompt = self._render(probe, True)
        full = self._render(
            probe + [{"role": "assistant", "content": [{"type": "text", "text": _SENTINEL}]}], False
        )
        head, _, suffix = full.partition(_SENTINEL)
        if head != prompt:
            raise ChatError(
                "chat template: the prompt rendered with add_generation_prompt=True is not a prefix of the "
                f"rendered conversation ({prompt[-40:]!r} vs {head[-40:]!r})"
            )
        return suffix

    def render_prompt(self, messages: Sequence[dict]) -> str:
        """The prompt text with unexpanded image placeholders (what vLLM takes)."""
        return self._render(messages, True)

    def check_images(self, messages: Sequence[dict], images: Sequence[Any]) -> None:
        expected = count_image_parts(messages)
        if expected != len(images):
            raise ChatError(
                f"conversation has {expected} image part(s) but {len(images)} image(s) were given"
            )

    def encode_prompt(self, messages: Sequence[dict], images: Sequence[Any] = ()) -> PromptEncoding:
        return self.encode_prompts([messages], [images])[0]

    def encode_prompts(
        self, conversations: Sequence[Sequence[dict]], images: Sequence[Sequence[Any]]
    ) -> list[PromptEncoding]:
        """Several prompts in one processor call (the processor's per-call work is paid once); each
        result is what :meth:`encode_prompt` gives for that prompt alone."""
        for messages, pictures in zip(conversations, images, strict=True):
            self.check_images(messages, pictures)
        texts = [self.render_prompt(messages) for messages in conversations]
        pil = self.images([image for pictures in images for image in pictures])
        if not pil:
            rows = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
            return [PromptEncoding(input_ids=list(ids), vision={}) for ids in rows]
        batch = self.processor(text=texts, images=pil, padding=len(texts) > 1, return_tensors="pt")
        out, image, patch = [], 0, 0
        for row, pictures in enumerate(images):
            vision = {}
            if pictures:
                grid = batch["image_grid_thw"][image : image + len(pictures)]
                patches = int(grid.prod(dim=-1).sum())
                vision = {
                    "pixel_values": batch["pixel_values"][patch : patch + patches],
                    "image_grid_thw": grid,
                }
                image, patch = image + len(pictures), patch + patches
            ids = batch["input_ids"][row][batch["attention_mask"][row].bool()]
            out.append(PromptEncoding(input_ids=ids.tolist(), vision=vision))
        return out

    def prompt_length(self, messages: Sequence[dict], images: Sequence[str | Path] = ()) -> int:
        """Tokens :meth:`encode_prompt` would give (image tokens included), from the text and the
        image files' headers alone: nothing is decoded, no pixels are processed."""
        ids = self.tokenizer(self.render_prompt(messages), add_special_tokens=False)["input_ids"]
        return len(ids) + sum(self.visual_tokens(image) - 1 for image in images)

    def visual_tokens(self, image: str | Path) -> int:
        """Tokens one image file becomes (after :func:`mpo.images.fit_image` and the processor's
        patch merge), from its header."""
        from mpo.images import fitted_size, image_size, resize_rule

        image_processor = self.processor.image_processor
        width, height = image_size(image)
        rule = resize_rule(image_processor)
        if rule is not None:
            width, height = fitted_size((width, height), rule, image)
        patches = image_processor.get_number_of_image_patches(height, width, {})
        return patches // image_processor.merge_size**2

    def images(self, images: Sequence[Any]) -> list:
        """Paths, open files or PIL images as the RGB images this processor is given: opened and
        resized by :func:`mpo.images.fit_image`, the one image path of rollout, scoring and training."""
        from mpo.images import fit_image

        return [fit_image(image, self.processor.image_processor) for image in images]

    def vision(self, images: Sequence[Any]) -> dict[str, Any]:
        """The image half of :meth:`encode_prompt` alone (``pixel_values``, ``image_grid_thw``)."""
        if not images:
            return {}
        processed = self.processor.image_processor(images=self.images(images), return_tensors="pt")
        return {k: processed[k] for k in ("pixel_values", "image_grid_thw")}

    def response_ids(self, response: str) -> list[int]:
        """Token ids of a response followed by the end-of-turn suffix."""
        return self.responses_ids([response])[0]

    def responses_ids(self, responses: Sequence[str]) -> list[list[int]]:
        """:meth:`response_ids` of several responses in one tokenizer call."""
        texts = [response + self.suffix for response in responses]
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def encode_response(
        self, messages: Sequence[dict], images: Sequence[Any], response: str
    ) -> ResponseEncoding:
        prompt = self.encode_prompt(messages, images)
        ids = prompt.input_ids + self.response_ids(response)
        return ResponseEncoding(input_ids=ids, response_start=len(prompt.input_ids), vision=prompt.vision)

    def encode_pair(
        self, messages: Sequence[dict], images: Sequence[Any], chosen: str, rejected: str
    ) -> PairEncoding:
        prompt = self.encode_prompt(messages, images)
        return PairEncoding(
            prompt_ids=prompt.input_ids,
            chosen_ids=self.response_ids(chosen),
            rejected_ids=self.response_ids(rejected),
            vision=prompt.vision,
        )


def multimodal_token_types(input_ids, image_token_id: int, video_token_id: int, attention_mask=None):
    """Qwen2.5-VL's ``mm_token_type_ids`` (0 text, 1 image, 2 video) from the token ids.

    transformers 5 computes the multimodal (3-D) rotary positions from these; without them image
    tokens get plain 1-D positions, which is not what the published models compute. Padding is 0."""
    types = (input_ids == image_token_id).long() + 2 * (input_ids == video_token_id).long()
    return types if attention_mask is None else types * attention_mask.long()


def mrope_positions(model, input_ids, attention_mask, image_grid_thw):
    """Qwen2.5-VL's multimodal rotary position ids [3, N, T], from the (unwrapped) model's own
    ``get_rope_index``; None for a model without one (text-only)."""
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "get_rope_index"):
        return None
    types = multimodal_token_types(input_ids, model.config.image_token_id, model.config.video_token_id)
    positions, _ = inner.get_rope_index(
        input_ids, mm_token_type_ids=types, image_grid_thw=image_grid_thw, attention_mask=attention_mask
    )
    return positions
