"""Batched, in-process scoring of (conversation, response) items with a reward model.

An item is a :class:`reward.items.ScoreItem`: a prompt record (HF chat messages whose
``{"type": "image"}`` parts take its images in order: paths, PIL images, or ``{"bytes", "path"}``
structs), the assistant response to score, and ``where`` (e.g. ``file:line``) for messages. Records
become items through :func:`reward.items.rollout_items` and :func:`reward.items.pair_items`; a plain
``{"messages", "images", "response", "where"}`` object is taken too. Options: :class:`ScoreOptions`.

How a call runs:

1. Every item is checked before anything heavy happens: messages a list of objects, response a
   string, not empty (unless ``allow_empty``), images a list (:func:`reward.items.as_item`).
2. The processor is loaded (once) and each item encoded through :class:`mpo.chat.ChatEncoder`,
   still before the model's weights load: each image is opened, checked and resized once
   (:func:`mpo.data.images.fit_image`); a bad item is an error naming it. Items that share a prompt
   (same messages and images: the samples of one rollout prompt, the two responses of a benchmark
   row) share one prompt encoding, so each image is decoded and preprocessed once; distinct prompts
   go through the processor together. Then the model loads (once).
   Text holding a control token's literal (``<|im_end|>``...) is scored as plain text; with
   ``special_tokens="error"`` such an item is refused before the model loads.
3. Items longer than ``max_length`` tokens (image tokens included; default: the model's
   ``max_position_embeddings``) follow ``on_too_long``: ``"error"`` (default) stops with the item
   named; ``"skip"`` makes :meth:`Scorer.score_all` leave it unscored and list it in
   :attr:`ScoreResult.skipped` (the caller reports and counts them). :meth:`Scorer.score` owes one
   score per item, so there a too-long item is always an error. Nothing is truncated: cutting a
   conversation changes what is being judged, and image tokens cannot be cut.
4. Items are sorted by length (longest first) and cut into batches of at most ``max_batch_size``
   rows whose padded size (rows x longest row) stays within ``token_budget``; an item longer than the
   budget gets a batch of its own. Rows are padded on the right (default), so every real token keeps
   exactly the inputs and positions it has unpadded; the model reads the score at the last real
   token, found from the mask, so ``padding_side="left"`` gives the same scores (rotary attention
   only sees relative positions; the multimodal positions are computed from the mask).
   When items share prompts (and ``share_prompts``, the default), prompts are batched the same way
   and each runs through the model once; its responses, batched by response length within the
   same budget, attend to its cached keys and values (:mod:`reward.forward`).
5. Scores come back in input order. A non-finite score is an error naming the item.

Scores do not depend on batch size, padding or order beyond float rounding (about 1e-6 in fp32).

The multimodal rotary positions of Qwen2.5-VL need ``mm_token_type_ids`` (0 text, 1 image,
2 video); without it transformers falls back to 1-D positions for image tokens, which is not what
the published model computes. The scorer derives it from the token ids for every batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from reward.forward import Encoded, run_prompts, score_full, score_responses
from reward.items import ScoreError, ScoreItem, as_item, fitted, prompt_key, where_of

ON_TOO_LONG = ("error", "skip")
__all__ = ["ON_TOO_LONG", "ScoreError", "ScoreItem", "ScoreOptions", "ScoreResult", "Scorer", "plan_batches"]


@dataclass(frozen=True)
class ScoreOptions:
    """How a :class:`Scorer` runs (checked when made; ``device`` None: CUDA when there is one)."""

    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    device: str | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    token_budget: int = 8192
    max_batch_size: int = 64
    max_length: int | None = None
    on_too_long: str = "error"
    allow_empty: bool = False
    progress: bool = True
    padding_side: str = "right"
    share_prompts: bool = True
    special_tokens: str = "escape"  # escape: control-token text scored as plain text (mpo.control_tokens)

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ScoreError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.padding_side not in ("right", "left"):
            raise ScoreError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")
        if self.special_tokens not in ("escape", "error"):
            raise ScoreError(f"special_tokens must be escape or error, got {self.special_tokens!r}")
        if self.on_too_long not in ON_TOO_LONG:
            raise ScoreError(f"on_too_long must be one of {', '.join(ON_TOO_LONG)}, got {self.on_too_long!r}")
        if self.token_budget < 1 or self.max_batch_size < 1 or (self.max_length is not None and self.max_length < 1):
            raise ScoreError("token_budget, max_batch_size and max_length must be >= 1")

    @classmethod
    def for_rounds(cls, model) -> ScoreOptions:
        """A round's score stage: the recipe's ``model`` section (dtype, attention, pixel bounds);
        empty responses scored (pairs counts them), no progress bars."""
        return cls(dtype=model.dtype, attn_implementation=model.attn_implementation, min_pixels=model.min_pixels,
                   max_pixels=model.max_pixels, allow_empty=True, progress=False)


@dataclass
class Skipped:
    index: int
    where: str
    num_tokens: int


@dataclass
class ScoreResult:
    """``scores[i]`` is item i's score, or None if it was skipped (then it is in ``skipped``)."""

    scores: list[float | None]
    skipped: list[Skipped] = field(default_factory=list)
    num_tokens: int = 0  # real (unpadded) tokens scored
    num_batches: int = 0


def plan_batches(
    lengths: Sequence[int], token_budget: int, max_batch_size: int, sort_keys: Sequence[int] | None = None
) -> list[list[int]]:
    """Group indices into batches, in descending order of ``sort_keys`` (default: ``lengths``):
    rows x longest row <= ``token_budget`` (a longer single item gets a batch of its own) and at
    most ``max_batch_size`` rows."""
    keys = lengths if sort_keys is None else sort_keys
    order = sorted(range(len(lengths)), key=lambda i: (-keys[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index in order:
        if current and (
            len(current) >= max_batch_size or (len(current) + 1) * max(longest, lengths[index]) > token_budget
        ):
            batches.append(current)
            current, longest = [], 0
        current.append(index)
        longest = max(longest, lengths[index])
    if current:
        batches.append(current)
    return batches


class Scorer:
    """Score items with a Skywork-layout reward model folder; ``scorer.score`` fits
    ``reward.benchmarks.evaluate``'s ``score_fn``."""

    def __init__(self, model_dir: str | Path | None, options: ScoreOptions | None = None, **overrides):
        """``options`` (default :class:`ScoreOptions`), with ``overrides`` by name (``progress=False``)."""
        names = {f.name for f in fields(ScoreOptions)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"Scorer: unknown option(s) {', '.join(unknown)}")
        self.options = replace(options or ScoreOptions(), **overrides)
        if model_dir is not None:
            from mpo.models import model_folder

            model_dir = model_folder(model_dir, "reward model", reward=True)  # once per process
        self.model_dir = model_dir
        self.device = self.options.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = None
        self.processor = None
        self.encoder = None

    def offload(self) -> None:
        """Move the reward model off the accelerator while other stages run (back on the next score)."""
        if self.model is not None and torch.device(self.device).type == "cuda":
            self.model.to("cpu")
            torch.cuda.empty_cache()

    @classmethod
    def from_model(cls, model, processor, **options) -> Scorer:
        """A scorer around an already built :class:`reward.model.RewardModel` and its processor."""
        options.setdefault("device", str(next(model.parameters()).device))
        scorer = cls(None, **options)
        scorer._attach(model.eval(), processor)
        return scorer

    # ------------------------------------------------------------------ loading

    def load(self) -> Scorer:
        """Load model and processor (once; a model :meth:`offload` moved away comes back)."""
        if self.model is not None:
            if next(self.model.parameters()).device.type != torch.device(self.device).type:
                self.model.to(self.device)
            return self
        from reward.model import RewardModel

        self._encoder()
        o = self.options
        model = RewardModel.from_pretrained(
            self.model_dir, dtype=o.dtype, attn_implementation=o.attn_implementation, device=self.device
        )
        self._attach(model, self.processor)
        return self

    def _encoder(self):
        """The processor's :class:`mpo.chat.ChatEncoder`, the processor loaded on first use (not the weights)."""
        if self.encoder is None:
            from mpo.chat import ChatEncoder
            from mpo.models import load_processor

            self.processor = load_processor(self.model_dir, self.options.min_pixels, self.options.max_pixels)
            self.encoder = ChatEncoder(self.processor)
        return self.encoder

    def _attach(self, model, processor) -> None:
        from mpo.chat import ChatEncoder

        if self.encoder is None or self.processor is not processor:
            self.processor, self.encoder = processor, ChatEncoder(processor)
        self.model = model
        config = model.config
        self.limit = self.options.max_length or config.text_config.max_position_embeddings
        self.pad_id = self.encoder.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.encoder.tokenizer.eos_token_id or 0
        self.image_token_id = config.image_token_id
        self.video_token_id = config.video_token_id

    # ------------------------------------------------------------------ encoding

    def encode(self, items: Sequence[ScoreItem | dict], chunk: int = 32) -> list[Encoded]:
        """Encode every item; items with the same messages and images share one prompt encoding, and
        each of its images is opened, checked and resized once (:func:`reward.items.fitted`).
        Distinct prompts go through the processor ``chunk`` at a time, responses through the
        tokenizer in one call."""
        from tqdm import tqdm

        from mpo.chat import ChatError

        encoder = self._encoder()
        items = [as_item(item, n, allow_empty=True) for n, item in enumerate(items)]
        image_processor = getattr(self.processor, "image_processor", None)
        keys, first, pictures, opened = [], {}, {}, {}
        for index, item in enumerate(items):
            key = prompt_key(item)
            keys.append(key)
            if key in first:
                continue
            first[key] = index
            try:
                encoder.check_images(item.messages, item.images or [])
            except ChatError as err:
                raise ScoreError(f"{where_of(item, index)}: {err}") from None
            for image, image_key in zip(item.images or [], key[1]):  # each image read once, before any bar
                if image_key not in opened:
                    opened[image_key] = fitted(image, image_processor, where_of(item, index))
            pictures[key] = [opened[image_key] for image_key in key[1]]
        distinct = list(first.items())
        prompts = {}
        with tqdm(total=len(distinct), desc="encoding", unit="prompt", disable=not self.options.progress) as bar:
            for start in range(0, len(distinct), chunk):
                part = distinct[start : start + chunk]
                encoded = encoder.encode_prompts([items[n].messages for _, n in part], [pictures[k] for k, _ in part])
                prompts.update(zip((key for key, _ in part), encoded))
                bar.update(len(part))
        responses = encoder.responses_ids([item.response for item in items])
        return [Encoded(prompts[key], ids) for key, ids in zip(keys, responses)]

    # ------------------------------------------------------------------ scoring

    def score_all(self, items: Sequence[ScoreItem | dict]) -> ScoreResult:
        """Score ``items``; too-long items are skipped or raise, per ``on_too_long``."""
        return self._run(items, skip=self.options.on_too_long == "skip")

    def score(self, items: Sequence[ScoreItem | dict]) -> list[float]:
        """One finite score per item, in order (the ``score_fn`` of ``reward.benchmarks``). A too-long
        item is an error here whatever ``on_too_long`` says: the caller needs every score."""
        return [float(s) for s in self._run(items, skip=False).scores]

    def _run(self, items: Sequence[ScoreItem | dict], skip: bool) -> ScoreResult:
        items = [as_item(item, n, self.options.allow_empty) for n, item in enumerate(items)]
        if not items:
            return ScoreResult(scores=[])
        if self.options.special_tokens == "error":
            self._refuse_control_tokens(items)
        encoded = self.encode(items)  # before the weights load: a bad image is named first
        self.load()
        result = ScoreResult(scores=[None] * len(items))
        todo = []
        for index, enc in enumerate(encoded):
            if enc.num_tokens <= self.limit:
                todo.append(index)
                continue
            where = where_of(items[index], index)
            if not skip:
                raise ScoreError(
                    f"{where}: {enc.num_tokens} tokens (image tokens included) exceeds max_length "
                    f"{self.limit}; raise max_length, lower max_pixels, or skip such items (on_too_long=skip)"
                )
            result.skipped.append(Skipped(index, where, enc.num_tokens))
        self._score_batches(items, encoded, todo, result)
        return result

    __call__ = score

    def _refuse_control_tokens(self, items: list[ScoreItem]) -> None:
        """``special_tokens=error``: the first item holding a control token's text, before weights load."""
        from mpo.control_tokens import check_rows, literals

        self._encoder()
        check_rows(literals(self.processor), ((where_of(item, n), item.messages, {"response": item.response})
                                              for n, item in enumerate(items)), "--special-tokens")

    @torch.inference_mode()
    def _score_batches(self, items, encoded, todo: list[int], result: ScoreResult) -> None:
        from tqdm import tqdm

        groups: dict[int, list[int]] = {}  # items by (shared) prompt encoding
        for index in todo:
            groups.setdefault(id(encoded[index].prompt), []).append(index)
        run = self._run_shared if self.options.share_prompts and len(groups) < len(todo) else self._run_full
        with tqdm(total=len(todo), desc="scoring", unit="item", disable=not self.options.progress) as bar:
            for indices, scores in run(encoded, todo, list(groups.values())):
                for index, value in zip(indices, scores.float().cpu().tolist()):
                    if not math.isfinite(value):
                        raise ScoreError(f"{where_of(items[index], index)}: non-finite score {value}")
                    result.scores[index] = value
                result.num_tokens += sum(encoded[i].num_tokens for i in indices)
                result.num_batches += 1
                bar.update(len(indices))

    def _run_full(self, encoded, todo, groups):
        """Every item as prompt + response, longest first, batched by the token budget."""
        for batch in plan_batches(
            [encoded[i].num_tokens for i in todo], self.options.token_budget, self.options.max_batch_size
        ):
            indices = [todo[i] for i in batch]
            rows = [encoded[i] for i in indices]
            yield indices, score_full(self.model, rows, self.pad_id, self.options.padding_side, self.device)

    def _run_shared(self, encoded, todo, groups):
        """Prompts in chunks within the token budget, each chunk's prompts run once; then their
        responses, in batches of similar response lengths, on the prompts' cached keys and values."""
        prompt_lengths = [len(encoded[group[0]].prompt.input_ids) for group in groups]
        for chunk in plan_batches(prompt_lengths, self.options.token_budget, self.options.max_batch_size):
            prompts = [encoded[groups[g][0]].prompt for g in chunk]
            done = run_prompts(self.model, prompts, self.pad_id, self.options.padding_side, self.device)
            rows = [(slot, index) for slot, g in enumerate(chunk) for index in groups[g]]
            sizes = [len(encoded[index].response_ids) for _, index in rows]
            width = done.mask.shape[1]
            for batch in plan_batches(
                [width + n for n in sizes], self.options.token_budget, self.options.max_batch_size, sizes
            ):
                picked = [rows[b] for b in batch]
                responses = [encoded[index].response_ids for _, index in picked]
                slots = [slot for slot, _ in picked]
                yield (
                    [index for _, index in picked],
                    score_responses(self.model, done, slots, responses, self.pad_id, self.device),
                )
