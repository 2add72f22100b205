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


class ChatError(ValueError):
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
        full = self._render(probe + [{"role": "assistant", "content": [{"type": "text", "text": _SENTINEL}]}], False)
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

    def encode_prompt(self, messages: Sequence[dict], images: Sequence[Any] = ()) -> PromptEncoding:
        expected = count_image_parts(messages)
        if expected != len(images):
            raise ChatError(f"conversation has {expected} image part(s) but {len(images)} image(s) were given")
        text = self.render_prompt(messages)
        if images:
            pil = [_as_image(image) for image in images]
            batch = self.processor(text=[text], images=pil, return_tensors="pt")
            vision = {k: batch[k] for k in ("pixel_values", "image_grid_thw") if k in batch}
        else:
            batch = self.tokenizer([text], add_special_tokens=False)
            vision = {}
        return PromptEncoding(input_ids=[int(i) for i in batch["input_ids"][0]], vision=vision)

    def encode_prompts(self, prompts: Sequence[tuple[Sequence[dict], Sequence[Any]]]) -> list[PromptEncoding]:
        """Many ``(messages, images)`` prompts at once, each encoded exactly as :meth:`encode_prompt`
        encodes it (the same ids, equal pixel tensors), with one image-processor call over all the
        images (:meth:`encode_images`) and one tokenizer call over all the texts (:meth:`prompt_ids`)
        instead of one processor call per prompt. ``pixel_values`` are split per prompt by
        ``image_grid_thw`` (views into the one processed tensor)."""
        prompts = [(list(messages), [_as_image(image) for image in images]) for messages, images in prompts]
        for messages, images in prompts:
            self._check_image_count(messages, len(images))
        flat = [image for _, images in prompts for image in images]
        vision = self.encode_images(flat) if flat else {}
        tokens = iter(self.image_token_counts(vision) if flat else [])
        rows = self.prompt_ids([(messages, [next(tokens) for _ in images]) for messages, images in prompts])
        patches = vision["image_grid_thw"].prod(-1).tolist() if flat else []
        out, first, patch = [], 0, 0
        for (_, images), row in zip(prompts, rows):
            last = first + len(images)
            size = sum(patches[first:last])
            encoding = {}
            if images:
                encoding = {
                    "pixel_values": vision["pixel_values"][patch : patch + size],
                    "image_grid_thw": vision["image_grid_thw"][first:last],
                }
            out.append(PromptEncoding(input_ids=row, vision=encoding))
            first, patch = last, patch + size
        return out

    def encode_images(self, images: Sequence[Any]) -> dict[str, Any]:
        """``pixel_values`` and ``image_grid_thw`` of many images in one image-processor call, as the
        processor computes them (what :meth:`encode_prompt` returns as ``vision`` for those images)."""
        return dict(self.processor.image_processor(images=[_as_image(i) for i in images], return_tensors="pt"))

    def image_token_counts(self, vision: dict[str, Any]) -> list[int]:
        """Placeholder tokens the processor puts in the text for each image of :meth:`encode_images`."""
        token = self.processor.image_token
        return [
            len(self.processor.replace_image_token(vision, image_idx=i)) // len(token)
            for i in range(len(vision["image_grid_thw"]))
        ]

    def image_tokens(self, width: int, height: int) -> int:
        """Placeholder tokens of an image of this size, from the size alone (the image processor's
        own patch count, the one vLLM plans with, over ``merge_size**2``); equal to what
        :meth:`image_token_counts` gives once the image is processed (tested)."""
        image_processor = self.processor.image_processor
        return image_processor.get_number_of_image_patches(height, width) // image_processor.merge_size**2

    def prompt_ids(self, prompts: Sequence[tuple[Sequence[dict], Sequence[int]]]) -> list[list[int]]:
        """Token ids of many prompts, each given as ``(messages, tokens per image)``, in one tokenizer
        call: the ids :meth:`encode_prompt` gives, without processing the images.

        The processor expands each image placeholder in the *text* (``<|image_pad|>`` once per merged
        patch) and then tokenizes; here the unexpanded text is tokenized the way the processor calls
        the tokenizer and each placeholder id is repeated instead. The two agree because the
        placeholder is a special token the tokenizer keeps whole; a prompt where it does not (the
        token typed in the user's text) is an error, as it is for the processor."""
        prompts = [(list(messages), list(counts)) for messages, counts in prompts]
        for messages, counts in prompts:
            self._check_image_count(messages, len(counts))
        out: list[list[int] | None] = [None] * len(prompts)
        texts = [self.render_prompt(messages) for messages, _ in prompts]
        for images in (False, True):
            which = [i for i, (_, counts) in enumerate(prompts) if bool(counts) == images]
            if not which:
                continue
            # encode_prompt: the processor calls the tokenizer with its defaults; text alone, without
            # special tokens.
            keywords = {} if images else {"add_special_tokens": False}
            rows = self.tokenizer([texts[i] for i in which], **keywords)["input_ids"]
            for i, row in zip(which, rows):
                out[i] = self._expand(list(row), prompts[i][1]) if images else list(row)
        return out

    def _expand(self, row: list[int], counts: list[int]) -> list[int]:
        token_id = self.processor.image_token_id
        if row.count(token_id) != len(counts):
            raise ChatError(
                f"the prompt text has {row.count(token_id)} image placeholder token(s) for {len(counts)} image(s)"
            )
        ids, counts = [], iter(counts)
        for t in row:
            if t == token_id:
                ids.extend([token_id] * next(counts))
            else:
                ids.append(t)
        return ids

    def _check_image_count(self, messages: Sequence[dict], given: int) -> None:
        expected = count_image_parts(messages)
        if expected != given:
            raise ChatError(f"conversation has {expected} image part(s) but {given} image(s) were given")

    def response_ids(self, response: str) -> list[int]:
        """Token ids of a response followed by the end-of-turn suffix."""
        return list(self.tokenizer(response + self.suffix, add_special_tokens=False)["input_ids"])

    def responses_ids(self, responses: Sequence[str]) -> list[list[int]]:
        """:meth:`response_ids` of each response, in one tokenizer call."""
        if not responses:
            return []
        rows = self.tokenizer([r + self.suffix for r in responses], add_special_tokens=False)["input_ids"]
        return [list(row) for row in rows]

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


def _as_image(image: Any):
    if isinstance(image, (str, Path)):
        from mpo.data import open_image

        return open_image(image)
    return image
