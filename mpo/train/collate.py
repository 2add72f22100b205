"""Preference pairs as training batches: checks, the length policy, a dataset and the collator.

- :func:`check_pairs` rejects unusable pairs up front (empty chosen/rejected, chosen == rejected,
  image count or file problems) with one line per pair naming it (``file:line`` when it came from a
  file), so nothing fails half-way through a run.
- :class:`PairDataset` encodes each pair through :class:`mpo.chat.ChatEncoder` (the prompt and its
  images once; chosen and rejected as response tokens including the end-of-turn suffix) and applies
  ``train.on_too_long`` to pairs whose ``prompt + response`` exceeds ``max_length``: ``truncate``
  cuts the responses' tails (never prompt or image tokens; a pair whose prompt alone leaves no room
  is skipped), ``skip`` drops the pair, ``error`` stops. Every truncation and skip is counted in
  :class:`LengthReport` and named in its messages. Items are re-encoded on access (pixels are not
  held in memory); the length decisions are made once, at construction.
- :class:`PairCollator` builds the batch :func:`mpo.train.logprobs.pair_logps` consumes: rows ``[0, B)``
  are ``prompt+chosen``, rows ``[B, 2B)`` ``prompt+rejected``, right-padded; ``response_mask`` marks
  response tokens; ``pixel_values`` / ``image_grid_thw`` hold each pair's images ONCE (not repeated
  for the rejected row). Text-only and image pairs mix freely in one batch.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mpo.chat import ChatEncoder, count_image_parts
from mpo.errors import MpoError
from mpo.records import PreferencePair


class PairError(MpoError):
    """Pairs that cannot be trained on; the message names each one."""


def describe(pair: PreferencePair, where: str | None) -> str:
    return f"{where} (prompt_id {pair.prompt_id!r})" if where else f"pair {pair.prompt_id!r}"


def pair_problem(pair: PreferencePair) -> str | None:
    """What makes a pair unusable, or None: the one pair check of MPO and reward-model training.

    Responses are compared after stripping surrounding whitespace (a pair that differs only there
    teaches nothing)."""
    for name in ("chosen", "rejected"):
        if not getattr(pair, name).strip():
            return f"field {name!r} is empty (a pair needs two non-empty responses)"
    if pair.chosen.strip() == pair.rejected.strip():
        return "chosen and rejected are the same response (nothing to learn)"
    expected = count_image_parts(pair.messages)
    if expected != len(pair.images):
        return f"messages have {expected} image part(s) but the pair lists {len(pair.images)} image(s)"
    for image in pair.images:
        if not Path(image).is_file():
            return f"image not found: {image}"
    return None


def check_pairs(pairs: list[PreferencePair], wheres: list[str] | None = None) -> None:
    """Raise :class:`PairError` naming every unusable pair (first 20 shown)."""
    wheres = wheres or [None] * len(pairs)
    problems = [f"{describe(p, w)}: {msg}" for p, w in zip(pairs, wheres) if (msg := pair_problem(p))]
    if problems:
        shown = "\n".join(problems[:20])
        more = f"\n... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise PairError(f"{len(problems)} unusable preference pair(s):\n{shown}{more}")


def pair_key(pair: PreferencePair) -> str:
    """A content key for a pair (conversation, image bytes, responses): keys the reference cache."""
    digest = hashlib.sha256()
    digest.update(json.dumps([pair.messages, pair.chosen, pair.rejected], sort_keys=True).encode())
    for image in pair.images:
        digest.update(hashlib.sha256(Path(image).read_bytes()).digest())
    return digest.hexdigest()[:32]


@dataclass
class LengthReport:
    """What the length policy did; saved as ``data_report.json`` and printed."""

    pairs: int = 0
    kept: int = 0
    truncated: int = 0
    skipped: int = 0
    max_length: int = 0
    policy: str = "truncate"
    messages: list[str] = field(default_factory=list)  # the first MAX_MESSAGES; the counts are complete

    MAX_MESSAGES = 1000

    def note(self, message: str) -> None:
        if len(self.messages) < self.MAX_MESSAGES:
            self.messages.append(message)

    def summary(self) -> str:
        return (
            f"{self.pairs} pairs: {self.kept} kept ({self.truncated} truncated to max_length {self.max_length}), "
            f"{self.skipped} skipped (on_too_long={self.policy})"
        )


# Token ids kept from the length check (int32, so 50M ids = 200 MB): items then only re-run the image
# processor. Past the budget, items are re-tokenised on access instead.
TOKEN_CACHE_LIMIT = 50_000_000


@dataclass
class _Plan:
    pair: PreferencePair
    where: str | None
    chosen_len: int  # response tokens kept (after truncation)
    rejected_len: int
    prompt_len: int
    ids: tuple[array, array, array] | None = None  # prompt, chosen, rejected (truncated)
    types: dict[str, array] | None = None  # the prompt's per-token types (mpo.chat.PER_TOKEN)


def _plan(pair, where, encoded, max_length: int, policy: str, report: LengthReport) -> _Plan | None:
    prompt, chosen, rejected = len(encoded.prompt_ids), len(encoded.chosen_ids), len(encoded.rejected_ids)
    longest = prompt + max(chosen, rejected)
    if longest <= max_length:
        return _Plan(pair, where, chosen, rejected, prompt)
    name = describe(pair, where)
    what = f"prompt {prompt} + response {max(chosen, rejected)} tokens > max_length {max_length}"
    if policy == "error":
        raise PairError(f"{name}: {what} (train.on_too_long=error)")
    room = max_length - prompt
    if policy == "skip" or room < 1:
        reason = (
            "skipped"
            if policy == "skip"
            else "skipped: the prompt (images included) leaves no room, and prompts are never truncated"
        )
        report.skipped += 1
        report.note(f"{name}: {what}; {reason}")
        return None
    report.truncated += 1
    report.note(f"{name}: {what}; responses truncated to {room} tokens")
    return _Plan(pair, where, min(chosen, room), min(rejected, room), prompt)


class PairDataset(torch.utils.data.Dataset):
    """Preference pairs encoded on access, with the length policy decided at construction.

    ``ref_logps`` (optional, set by the reference pass) holds ``(chosen, rejected)`` per item.
    """

    def __init__(
        self, pairs, encoder: ChatEncoder, max_length: int, on_too_long: str = "truncate", wheres=None
    ):
        if on_too_long not in ("truncate", "skip", "error"):
            raise ValueError(f"on_too_long must be truncate, skip or error, got {on_too_long!r}")
        wheres = list(wheres) if wheres is not None else [None] * len(pairs)
        check_pairs(list(pairs), wheres)
        self.encoder = encoder
        self.report = LengthReport(pairs=len(pairs), max_length=max_length, policy=on_too_long)
        self.plans: list[_Plan] = []
        cached = 0
        for pair, where in zip(pairs, wheres):
            encoded = encoder.encode_pair(pair.messages, pair.images, pair.chosen, pair.rejected)
            plan = _plan(pair, where, encoded, max_length, on_too_long, self.report)
            if plan is None:
                continue
            size = plan.prompt_len + plan.chosen_len + plan.rejected_len
            if cached + size <= TOKEN_CACHE_LIMIT:
                cached += size
                plan.ids = (
                    array("i", encoded.prompt_ids),
                    array("i", encoded.chosen_ids[: plan.chosen_len]),
                    array("i", encoded.rejected_ids[: plan.rejected_len]),
                )
                plan.types = {k: array("b", v) for k, v in encoded.token_types.items()}
            self.plans.append(plan)
        self.report.kept = len(self.plans)
        if not self.plans:
            raise PairError(f"no trainable pairs left: {self.report.summary()}")
        self.ref_logps: list[tuple[float, float]] | None = None
        self._keys: list[str] | None = None

    def __len__(self) -> int:
        return len(self.plans)

    def keys(self) -> list[str]:
        if self._keys is None:
            self._keys = [pair_key(plan.pair) for plan in self.plans]
        return self._keys

    def __getitem__(self, index: int) -> dict:
        plan = self.plans[index]
        if plan.ids is not None:
            prompt, chosen, rejected = (ids.tolist() for ids in plan.ids)
            types = {k: v.tolist() for k, v in plan.types.items()}
            vision = self.encoder.vision(plan.pair.images)
        else:
            pair = plan.pair
            encoded = self.encoder.encode_pair(pair.messages, pair.images, pair.chosen, pair.rejected)
            if len(encoded.prompt_ids) != plan.prompt_len:
                raise PairError(f"{describe(pair, plan.where)}: prompt re-encoded to a different length")
            prompt, vision, types = encoded.prompt_ids, encoded.vision, encoded.token_types
            chosen, rejected = (
                encoded.chosen_ids[: plan.chosen_len],
                encoded.rejected_ids[: plan.rejected_len],
            )
        item = {
            "index": index,
            "prompt_ids": prompt,
            "chosen_ids": chosen,
            "rejected_ids": rejected,
            "prompt_types": types,
            **vision,
        }
        if self.ref_logps is not None:
            item["ref_logps"] = self.ref_logps[index]
        return item


ITEM_KEYS = ("index", "prompt_ids", "chosen_ids", "rejected_ids", "prompt_types", "ref_logps")


def pad_pairs(items: list[dict], pad_token_id: int) -> dict:
    """What both pair collators build (this one and :class:`reward.collate.PairCollator`): rows
    ``[prompt+chosen for each pair, prompt+rejected for each pair]`` right-padded into ``input_ids``
    and ``attention_mask`` [2B, T]; the prompts' per-token types (``mm_token_type_ids``,
    ``token_type_ids``: whatever the family's processor returns) along them, 0 over responses and
    padding; and each pair's per-image tensors ONCE (every other key the processor returned,
    ``pixel_values``, ``image_grid_thw``, ``image_sizes``...; concatenated in pair order; text-only
    pairs add none). Also ``starts`` [2B]: where each row's response begins."""
    rows = [it["prompt_ids"] + it["chosen_ids"] for it in items]
    rows += [it["prompt_ids"] + it["rejected_ids"] for it in items]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask,
             "starts": torch.tensor([len(it["prompt_ids"]) for it in items] * 2, dtype=torch.long)}
    for key in sorted({k for it in items for k in it.get("prompt_types", {})}):
        types = torch.zeros((len(rows), width), dtype=torch.long)
        for i, it in enumerate(items + items):
            given = it.get("prompt_types", {}).get(key, [0] * len(it["prompt_ids"]))
            types[i, : len(given)] = torch.tensor(given, dtype=torch.long)
        batch[key] = types
    for key in sorted({k for it in items for k in it if k not in ITEM_KEYS}):
        batch[key] = torch.cat([it[key] for it in items if key in it])
    return batch


@dataclass
class PairCollator:
    """Collate :class:`PairDataset` items into one pair batch: :func:`pad_pairs`, plus what MPO needs
    beyond the reward trainer: ``response_mask`` (the response tokens), the items' ``indices`` and the
    precomputed reference log-probs."""

    pad_token_id: int

    def __call__(self, items: list[dict]) -> dict:
        batch = pad_pairs(items, self.pad_token_id)
        starts = batch.pop("starts")
        positions = torch.arange(batch["input_ids"].shape[1])
        batch["response_mask"] = (positions >= starts[:, None]) & batch["attention_mask"].bool()
        batch["indices"] = torch.tensor([it["index"] for it in items], dtype=torch.long)
        if all("ref_logps" in it for it in items):
            ref = torch.tensor([it["ref_logps"] for it in items], dtype=torch.float64)
            # Carried as the float64 bit pattern in an int64 tensor: Trainer casts float inputs to the
            # model dtype under DeepSpeed, and a bf16 sum of log-probs would lose whole nats.
            batch["ref_logps_bits"] = torch.cat([ref[:, 0], ref[:, 1]]).view(torch.int64)
        return batch


def pad_token_id(processor) -> int:
    tokenizer = getattr(processor, "tokenizer", processor)
    pad = tokenizer.pad_token_id
    return tokenizer.eos_token_id if pad is None else pad
