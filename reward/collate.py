"""Preference pairs for reward-model training: loading and checking, per-pair encoding, batching.

What it does:

- :func:`load_stage_pairs` reads a stage's data sources through :func:`mpo.data.load_preferences`
  (so every image is opened and checked up front; a missing image is an error naming file:line, or
  a counted skip with ``data.on_bad_image=skip``), keeps the stage's modality (``multimodal`` pairs
  have at least one image, ``text`` pairs none), and refuses pairs that teach nothing: an empty
  chosen or rejected response, or chosen == rejected. Those are errors naming file:line (for JSONL
  sources; other sources name the row), as is a pair whose image parts and images differ in
  number. Pairs longer than ``max_length`` tokens (image tokens included) are skipped and counted,
  or refused with ``on_too_long=error``; nothing is truncated, since the score is read at the last
  token and image tokens cannot be cut.
- :class:`PairDataset` encodes a pair when it is read (the prompt, images included, once; the two
  responses as token ids), so a large set never sits preprocessed in memory.
- :class:`PairCollator` right-pads the chosen rows, then the rejected rows, into one ``[2B, T]``
  batch. Images are kept once per pair (``pixel_values`` concatenated in pair order,
  ``image_grid_thw`` stacked); text-only pairs add none, so a batch may mix both.
- :class:`PairwiseRewardModel`, the model side of that batch format, runs the vision encoder once
  per pair and feeds the features to both of its rows, then scores all rows in one forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mpo.chat import multimodal_token_types
from mpo.errors import MpoError

MODALITIES = ("all", "multimodal", "text")


class PairDataError(MpoError):
    """A preference pair that cannot be trained on; the message names where it came from."""


@dataclass
class StagePairs:
    records: list  # PreferencePair
    where: list[str]  # "file:line" (or "file:row N") of each record
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> messages

    @property
    def num_multimodal(self) -> int:
        return sum(1 for r in self.records if r.images)


def check_pair(record, where: str) -> None:
    """Refuse a pair :func:`mpo.train.collate.pair_problem` refuses, naming where it came from."""
    from mpo.train.collate import pair_problem

    problem = pair_problem(record)
    if problem:
        raise PairDataError(f"{where}: {problem}")


def load_stage_pairs(paths, modality="all", image_root=None, on_bad_image="error", image_cache=None) -> StagePairs:
    """Load, check and filter the pairs of one training stage."""
    from mpo.data import load_preferences

    if modality not in MODALITIES:
        raise PairDataError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    out = StagePairs(records=[], where=[])
    for path in map(Path, paths):
        loaded = load_preferences(path, image_root=image_root, on_bad_image=on_bad_image, image_cache=image_cache)
        if loaded.skipped:
            out.skipped.setdefault("bad image", []).extend(loaded.skipped)
        for record, where in zip(loaded.records, loaded.sources):
            check_pair(record, where)
            if modality == "all" or (modality == "multimodal") == bool(record.images):
                out.records.append(record)
                out.where.append(where)
    return out


def pair_length(encoder, record) -> int:
    """Tokens of the longer of the pair's two sequences (prompt with expanded images + response)."""
    prompt = encoder.prompt_length(record.messages, record.images)
    return prompt + max(len(encoder.response_ids(record.chosen)), len(encoder.response_ids(record.rejected)))


def drop_too_long(pairs: StagePairs, encoder, max_length: int, on_too_long: str = "skip") -> StagePairs:
    """Remove (and count) pairs longer than ``max_length``, or raise with ``on_too_long=error``."""
    keep_records, keep_where = [], []
    for record, where in zip(pairs.records, pairs.where):
        length = pair_length(encoder, record)
        if length <= max_length:
            keep_records.append(record)
            keep_where.append(where)
            continue
        message = f"{where}: {length} tokens (image tokens included) exceeds max_length {max_length}"
        if on_too_long == "error":
            raise PairDataError(f"{message}; raise max_length, lower model.max_pixels, or skip such pairs "
                                "(on_too_long=skip)")
        pairs.skipped.setdefault("too long", []).append(message)
    pairs.records, pairs.where = keep_records, keep_where
    return pairs


class PairDataset(torch.utils.data.Dataset):
    """Pairs encoded on read: ``{"prompt_ids", "chosen_ids", "rejected_ids", "pixel_values"?,
    "image_grid_thw"?}``."""

    def __init__(self, records: list, encoder, where: list[str] | None = None):
        self.records = records
        self.encoder = encoder
        self.where = where or [f"pair {i}" for i in range(len(records))]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        from mpo.chat import ChatError

        record = self.records[index]
        try:
            encoded = self.encoder.encode_pair(record.messages, record.images, record.chosen, record.rejected)
        except (ChatError, ValueError) as err:
            raise PairDataError(f"{self.where[index]}: {err}") from None
        item = {"prompt_ids": encoded.prompt_ids, "chosen_ids": encoded.chosen_ids,
                "rejected_ids": encoded.rejected_ids}
        for key in ("pixel_values", "image_grid_thw"):
            if key in encoded.vision:
                item[key] = encoded.vision[key]
        return item


@dataclass
class PairCollator:
    """Batch pairs as ``[chosen rows..., rejected rows...]``, right-padded; images once per pair
    (:func:`mpo.train.collate.pad_pairs`, which the MPO collator shares), plus what the reward model
    needs beyond it:

    ``mm_token_type_ids`` (0 text, 1 image, 2 video) is derived from the token ids: Qwen2.5-VL's
    multimodal rotary positions need it (without it transformers falls back to 1-D positions),
    and :class:`reward.scorer.Scorer` passes the same, so training and scoring see equal inputs.
    """

    pad_id: int
    image_token_id: int
    video_token_id: int

    def __call__(self, examples: list[dict]) -> dict:
        from mpo.train.collate import pad_pairs

        batch = pad_pairs(examples, self.pad_id)
        del batch["starts"]  # the score is read at the last real token; responses need no mask
        types = multimodal_token_types(batch["input_ids"], self.image_token_id, self.video_token_id)
        batch["mm_token_type_ids"] = types * batch["attention_mask"]
        return batch


class PairwiseRewardModel(nn.Module):
    """Scores a ``[chosen rows..., rejected rows...]`` batch with one forward pass, encoding each
    pair's images once and feeding the features to both of its rows (transformers'
    ``mm_encoder_outputs``; where a transformers version lacks it, the images are run twice)."""

    accepts_loss_kwargs = False  # the Trainer then scales our per-batch mean for accumulation

    def __init__(self, reward):
        import inspect

        super().__init__()
        self.reward = reward
        parameters = inspect.signature(type(reward.backbone.model).forward).parameters
        self.features_once = "mm_encoder_outputs" in parameters

    def forward(self, input_ids, attention_mask, mm_token_type_ids=None, pixel_values=None,
                image_grid_thw=None):
        vision = {} if mm_token_type_ids is None else {"mm_token_type_ids": mm_token_type_ids}
        if pixel_values is not None:
            grids = torch.cat([image_grid_thw, image_grid_thw])
            if self.features_once:
                from mpo.train.logprobs import pair_image_features

                images = {"pixel_values": pixel_values, "image_grid_thw": image_grid_thw}
                vision["mm_encoder_outputs"] = {"image": pair_image_features(self.reward.backbone, images)}
            else:
                vision["pixel_values"] = torch.cat([pixel_values, pixel_values])
            vision["image_grid_thw"] = grids
        return self.reward(input_ids, attention_mask, **vision)
