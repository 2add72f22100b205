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

Text that holds a control token's literal (``<|im_end|>``, ``<|image_pad|>``...) is tokenized as plain
text, in prompts and responses alike (:mod:`mpo.control_tokens`); every other text as above.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpo import control_tokens as control
from mpo.errors import MpoError

_SENTINEL = "\u2063MPO-RESPONSE\u2063"


# Processor outputs that hold one value per token (padded with 0 beside input_ids); every other key
# the processor returns is per image (pixel_values, image_grid_thw, image_sizes, ...).
PER_TOKEN = ("mm_token_type_ids", "token_type_ids")


@dataclass
class PromptEncoding:
    input_ids: list[int]
    vision: dict[str, Any]  # the processor's per-image tensors (absent for text-only prompts)
    token_types: dict[str, list[int]] = field(default_factory=dict)  # PER_TOKEN keys, one per prompt token


@dataclass
class ResponseEncoding:
    input_ids: list[int]  # prompt + response + end-of-turn suffix
    response_start: int
    vision: dict[str, Any]
    token_types: dict[str, list[int]] = field(default_factory=dict)  # the prompt's (responses are 0)


@dataclass
class PairEncoding:
    prompt_ids: list[int]
    chosen_ids: list[int]  # response tokens only (with suffix)
    rejected_ids: list[int]
    vision: dict[str, Any]
    token_types: dict[str, list[int]] = field(default_factory=dict)  # the prompt's (responses are 0)


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
    """Encode conversations for one processor (any family's, or a plain tokenizer).

    ``stop_ids``: the model's end-of-sequence ids (its ``generation_config``'s; the tokenizer's EOS
    is always one). The end-of-turn suffix is read off the chat template; where the template puts no
    stop token after an assistant turn (GLM-4.1V: nothing; LLaVA-1.5: a space), the tokenizer's EOS
    follows it, so training teaches the model to stop."""

    def __init__(self, processor, stop_ids=()):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.stop_ids = {int(i) for i in stop_ids} | ({self.tokenizer.eos_token_id} - {None})
        self.lead, self.suffix = self._response_frame()
        self.literals = control.literals(processor)  # control-token texts, tokenized as plain text
        self._marker: tuple[int, str] | None = None  # the spare special token a prompt's escaped text is marked with
        self._counted: dict[tuple[int, int], int] = {}  # image size -> tokens, for families without a rule

    def _render(self, messages: Sequence[dict], generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=generation_prompt
        )

    def _response_frame(self) -> tuple[str, str]:
        """``(lead, suffix)``: what the template puts between the generation prompt and an assistant
        turn's text (LLaVA-1.5: a space), and after it, plus EOS where that holds no stop token. The
        assistant text is tried as a list of parts, then as a string (templates differ)."""
        probe = [{"role": "user", "content": [{"type": "text", "text": "q"}]}]
        prompt = self._render(probe, True)
        for content in ([{"type": "text", "text": _SENTINEL}], _SENTINEL):
            full = self._render(probe + [{"role": "assistant", "content": content}], False)
            head, found, suffix = full.partition(_SENTINEL)
            if found and head.startswith(prompt) and not head[len(prompt):].strip():
                break
        else:
            raise ChatError(
                "chat template: the prompt rendered with add_generation_prompt=True is not a prefix of the "
                f"rendered conversation ({prompt[-40:]!r} vs {head[-40:]!r})"
            )
        ids = self.tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else []
        if not self.stop_ids & set(ids) and self.tokenizer.eos_token:
            suffix += self.tokenizer.eos_token
        return head[len(prompt):], suffix

    def response_text(self, generated: str) -> str:
        """A generated continuation of the prompt as the response it is (without the template's lead)."""
        return generated[len(self.lead):] if self.lead and generated.startswith(self.lead) else generated

    def _special_tokens(self, text: str) -> bool:
        """Whether the tokenizer adds its special tokens (a BOS) to ``text``: not where the template
        already wrote the BOS (Gemma 3), so no prompt gets two."""
        bos = self.tokenizer.bos_token
        return bool(bos) and not text.startswith(bos)

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
        result is what :meth:`encode_prompt` gives for that prompt alone. A text holding a control
        literal is rendered as the marker, and the marker then replaced by the text's plain ids."""
        for messages, pictures in zip(conversations, images, strict=True):
            self.check_images(messages, pictures)
        marked = [self._marked(messages) for messages in conversations]
        encoded = self._encode_texts([self.render_prompt(messages) for messages, _ in marked], images)
        return [self._spliced(prompt, pieces) for prompt, (_, pieces) in zip(encoded, marked)]

    def _encode_texts(self, texts: list[str], images: Sequence[Sequence[Any]]) -> list[PromptEncoding]:
        pil = self.images([image for pictures in images for image in pictures])
        if not pil:
            return [PromptEncoding(list(self.tokenizer(text, add_special_tokens=self._special_tokens(text))
                                        ["input_ids"]), {}) for text in texts]
        if "image_grid_thw" not in self._image_keys():  # no way to split a batch's pixels: one call each
            return [self._one(text, self.images(pictures)) for text, pictures in zip(texts, images)]
        batch = self.processor(text=texts, images=pil, padding=len(texts) > 1, return_tensors="pt",
                               add_special_tokens=self._special_tokens(texts[0]))
        out, image, patch = [], 0, 0
        for row, pictures in enumerate(images):
            vision = {}
            if pictures:
                grid = batch["image_grid_thw"][image : image + len(pictures)]
                patches = int(grid.prod(dim=-1).sum())
                vision = {"pixel_values": batch["pixel_values"][patch : patch + patches], "image_grid_thw": grid}
                image, patch = image + len(pictures), patch + patches
            real = batch["attention_mask"][row].bool()
            out.append(PromptEncoding(batch["input_ids"][row][real].tolist(), vision,
                                      {k: batch[k][row][real].tolist() for k in PER_TOKEN if k in batch}))
        return out

    def _one(self, text: str, pil: list) -> PromptEncoding:
        """One prompt through the processor: its ids, per-token types and every per-image output."""
        batch = self.processor(text=[text], images=pil or None, return_tensors="pt",
                               add_special_tokens=self._special_tokens(text))
        vision = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", *PER_TOKEN)}
        return PromptEncoding(batch["input_ids"][0].tolist(), vision,
                              {k: batch[k][0].tolist() for k in PER_TOKEN if k in batch})

    def holds_literal(self, messages: Sequence[dict]) -> bool:
        """Whether any text of ``messages`` holds a control literal."""
        return any(control.first_literal(text, self.literals) for text in control.message_texts(messages))

    def _marked(self, messages: Sequence[dict]) -> tuple[Sequence[dict], list[list[int]]]:
        """``messages`` with each text that holds a control literal replaced by the marker, and those
        texts' plain ids in order (``messages`` itself and no ids where none does)."""
        if not self.holds_literal(messages):
            return messages, []
        marked, texts = control.mark(messages, self.literals, self.marker()[1])
        return marked, control.plain_ids(self.tokenizer, texts)

    def _spliced(self, prompt: PromptEncoding, pieces: list[list[int]]) -> PromptEncoding:
        if not pieces:
            return prompt
        ids, types = control.splice(prompt.input_ids, prompt.token_types, self.marker()[0], pieces)
        return PromptEncoding(ids, prompt.vision, types)

    def marker(self) -> tuple[int, str]:
        """``(id, text)`` of a special token neither the template nor the processor emits (chosen once,
        by encoding a probe prompt with an image and checking which ids appear)."""
        if self._marker is None:
            probe = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}]
            used = set(self._probe(probe)) | self.stop_ids | set(self.responses_ids(["a"])[0])
            for token_id, text in control.marker_candidates(self.processor, used)[:3]:
                probe[0]["content"][1]["text"] = text
                if self._probe(probe).count(token_id) == 1:
                    self._marker = (token_id, text)
                    break
            else:
                raise control.no_marker()
        return self._marker

    def _probe(self, messages: list[dict]) -> list[int]:
        """The ids of ``messages`` as a prompt with a small blank image (none without an image processor)."""
        from PIL import Image

        if getattr(self.processor, "image_processor", None) is None:
            text = self.render_prompt([{**m, "content": [p for p in m["content"] if p["type"] == "text"]}
                                       for m in messages])
            return self.tokenizer(text, add_special_tokens=self._special_tokens(text))["input_ids"]
        return self._one(self.render_prompt(messages), self.images([Image.new("RGB", (64, 64), "white")])).input_ids

    def _image_keys(self) -> set[str]:
        """The per-image keys this processor's image processor returns (its model_input_names)."""
        names = getattr(self.processor.image_processor, "model_input_names", None) or ()
        return set(names)

    def prompt_length(self, messages: Sequence[dict], images: Sequence[str | Path] = ()) -> int:
        """Tokens :meth:`encode_prompt` would give (image tokens included), from the text and the
        image files' headers alone: nothing is decoded, no pixels are processed."""
        return len(self.unexpanded_ids(messages, False)) + sum(self.visual_tokens(image) - 1 for image in images)

    def unexpanded_ids(self, messages: Sequence[dict], special_tokens: bool = True) -> list[int]:
        """The prompt's ids with one unexpanded placeholder per image (what vLLM expands itself); with
        ``special_tokens`` the BOS the processor would add."""
        marked, pieces = self._marked(messages)
        text = self.render_prompt(marked)
        ids = list(self.tokenizer(text, add_special_tokens=special_tokens and self._special_tokens(text))["input_ids"])
        return control.splice(ids, {}, self.marker()[0], pieces)[0] if pieces else ids

    def visual_tokens(self, image: str | Path) -> int:
        """Tokens one image file adds to a prompt, its placeholder included, from its header: for the
        Qwen family from the size :func:`mpo.data.images.fit_image` gives it and the processor's patch
        merge; for a family that resizes its own way, counted once per size by its processor."""
        from mpo.data.images import fitted_size, image_size, resize_rule

        image_processor = self.processor.image_processor
        width, height = image_size(image)
        rule = resize_rule(image_processor)
        if rule is None:
            if (width, height) not in self._counted:
                self._counted[(width, height)] = self._count(width, height)
            return self._counted[(width, height)]
        width, height = fitted_size((width, height), rule, image)
        patches = image_processor.get_number_of_image_patches(height, width, {})
        return patches // image_processor.merge_size**2

    def _count(self, width: int, height: int) -> int:
        from PIL import Image

        probe = self.render_prompt([{"role": "user", "content": [{"type": "image"}]}])
        plain = len(self.tokenizer(probe, add_special_tokens=self._special_tokens(probe))["input_ids"])
        return len(self._one(probe, self.images([Image.new("RGB", (width, height))])).input_ids) - plain + 1

    def images(self, images: Sequence[Any]) -> list:
        """Paths, open files or PIL images as the RGB images this processor is given: opened and
        resized by :func:`mpo.data.images.fit_image`, the one image path of rollout, scoring and training."""
        from mpo.data.images import fit_image

        return [fit_image(image, self.processor.image_processor) for image in images]

    def vision(self, images: Sequence[Any]) -> dict[str, Any]:
        """The image half of :meth:`encode_prompt` alone: the processor's per-image outputs for these
        images (they do not depend on the text around them)."""
        if not images:
            return {}
        probe = [{"role": "user", "content": [{"type": "image"} for _ in images]}]
        return self.encode_prompt(probe, images).vision

    def response_ids(self, response: str) -> list[int]:
        """Token ids of a response followed by the end-of-turn suffix."""
        return self.responses_ids([response])[0]

    def responses_ids(self, responses: Sequence[str]) -> list[list[int]]:
        """:meth:`response_ids` of several responses in one tokenizer call."""
        texts = [self.lead + response + self.suffix for response in responses]
        out = [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        for n, response in enumerate(responses):
            if control.first_literal(response, self.literals):  # lead + the text as plain text + suffix
                lead, suffix = (self.tokenizer(t, add_special_tokens=False)["input_ids"] if t else []
                                for t in (self.lead, self.suffix))
                out[n] = list(lead) + control.plain_ids(self.tokenizer, [response])[0] + list(suffix)
        return out

    def encode_response(
        self, messages: Sequence[dict], images: Sequence[Any], response: str
    ) -> ResponseEncoding:
        prompt = self.encode_prompt(messages, images)
        ids = prompt.input_ids + self.response_ids(response)
        return ResponseEncoding(ids, len(prompt.input_ids), prompt.vision, prompt.token_types)

    def encode_pair(
        self, messages: Sequence[dict], images: Sequence[Any], chosen: str, rejected: str
    ) -> PairEncoding:
        prompt = self.encode_prompt(messages, images)
        return PairEncoding(prompt.input_ids, self.response_ids(chosen), self.response_ids(rejected), prompt.vision,
                            prompt.token_types)


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
