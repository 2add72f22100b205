"""Control-token text inside data: the rule :class:`mpo.chat.ChatEncoder` applies to every text.

A *control literal* is the text of a token the model reads as structure, never as words: every
added token the tokenizer flags special (``<|im_end|>``, ``<|vision_start|>``, ``<s>``...) and the
processor's own media tokens (``image_token``, ``video_token``, ``boi_token``...; expanded into one
token per image patch) even where the tokenizer does not flag them. Added tokens that are not
special (Qwen3's ``<think>``) are ordinary vocabulary and stay as they are.

Scraped and model-written text holds such strings. Left alone, the tokenizer turns them into the
control tokens themselves: a ``<|im_end|>`` in a question ends the turn, an ``<|image_pad|>`` asks
for an image that is not there (the processor stops). ``data.special_tokens`` decides:

- ``escape`` (default): a text part (or string content, or response) that holds a control literal
  is tokenized as plain text, ``tokenizer(text, add_special_tokens=False,
  split_special_tokens=True)``: the literal becomes the ids of its characters. A prompt is rendered
  with each such text replaced by a *marker* (one spare special token that neither the template nor
  the processor emits or expands), put through the processor as any prompt is, and each marker is
  then replaced by its text's plain ids (:func:`splice`). A text without a literal is encoded
  exactly as before (same ids).
- ``error``: such a row is refused before any model loads, naming ``file:line: field`` (:func:`refusal`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from mpo.errors import MpoError

MODES = ("escape", "error")


class ControlTokenError(MpoError):
    """Data that holds a control token's text under ``data.special_tokens=error``, or an encoder with
    no spare token to escape it with."""


def literals(processor) -> tuple[str, ...]:
    """The control literals of ``processor`` (or a plain tokenizer), longest first."""
    tokenizer = getattr(processor, "tokenizer", processor)
    found = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    found |= set(tokenizer.all_special_tokens) | media_literals(processor)
    return tuple(sorted((t for t in found if t), key=lambda t: (-len(t), t)))


def media_literals(processor) -> set[str]:
    """The processor's own media tokens (it expands or inserts them around images)."""
    return {value for name, value in vars(processor).items() if name.endswith("_token") and isinstance(value, str)}


def first_literal(text: str, protected: Sequence[str]) -> str | None:
    """The first control literal in ``text`` (by position), or None."""
    hits = [(text.find(t), t) for t in protected if t in text]
    return min(hits)[1] if hits else None


def message_texts(messages: Sequence[dict]) -> Iterable[str]:
    """Every text of a conversation: string contents and the ``text`` of text parts."""
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            yield content
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    yield part["text"]


def find(protected: Sequence[str], messages: Sequence[dict] = (), **responses: str) -> tuple[str, str] | None:
    """``(field, literal)`` of the first control literal in ``messages`` (field ``messages``) or in
    one of the named responses (``chosen=...``), or None."""
    for text in message_texts(messages):
        literal = first_literal(text, protected)
        if literal:
            return "messages", literal
    for name, text in responses.items():
        literal = first_literal(text, protected) if isinstance(text, str) else None
        if literal:
            return name, literal
    return None


def refusal(where: str, found: tuple[str, str], setting: str = "data.special_tokens") -> ControlTokenError:
    field, literal = found
    return ControlTokenError(f"{where}: field {field!r}: the text contains the control token {literal!r} "
                             f"({setting}=error; 'escape' tokenizes it as plain text)")


def check_rows(protected: Sequence[str], rows: Iterable[tuple[str, Sequence[dict], dict]],
               setting: str = "data.special_tokens") -> None:
    """Refuse the first of ``rows`` (``(where, messages, {field: text})``) that holds a control literal."""
    for where, messages, responses in rows:
        found = find(protected, messages, **responses)
        if found:
            raise refusal(where, found, setting)


def check_pairs(protected: Sequence[str], pairs: Sequence, wheres: Sequence[str | None]) -> None:
    """:func:`check_rows` over preference pairs (messages, chosen, rejected)."""
    check_rows(protected, ((where or f"pair {pair.prompt_id!r}", pair.messages,
                            {"chosen": pair.chosen, "rejected": pair.rejected}) for pair, where in zip(pairs, wheres)))


def mark(messages: Sequence[dict], protected: Sequence[str], marker: str) -> tuple[list[dict], list[str]]:
    """``messages`` with every text that holds a control literal replaced by ``marker``, and those
    texts in order. Messages without one are the same objects."""
    out, texts = [], []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str) and first_literal(content, protected):
            out.append({**message, "content": marker})
            texts.append(content)
        elif isinstance(content, list) and any(isinstance(p, dict) and isinstance(p.get("text"), str)
                                               and first_literal(p["text"], protected) for p in content):
            parts = []
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str) and first_literal(part["text"],
                                                                                                   protected):
                    parts.append({**part, "text": marker})
                    texts.append(part["text"])
                else:
                    parts.append(part)
            out.append({**message, "content": parts})
        else:
            out.append(message)
    return out, texts


def plain_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of ``texts`` as plain text: control literals become the ids of their characters."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False,
                                           split_special_tokens=True)["input_ids"]]


def splice(ids: list[int], types: dict[str, list[int]], marker: int, pieces: Sequence[list[int]]
           ) -> tuple[list[int], dict[str, list[int]]]:
    """``ids`` with each ``marker`` id (in order) replaced by the next of ``pieces``; the per-token
    lists in ``types`` get 0 (text) for each inserted token."""
    at = [i for i, token in enumerate(ids) if token == marker]
    if not at:  # the template leaves these texts out (as it does without a literal: LLaVA's string contents)
        return ids, types
    if len(at) != len(pieces):
        raise ControlTokenError(f"the chat template rendered {len(at)} of {len(pieces)} texts that hold control-token "
                                "text; set data.special_tokens=error to find them, or clean the data")
    out, new_types, start = [], {k: [] for k in types}, 0
    for position, piece in zip(at, pieces):
        out += ids[start:position] + list(piece)
        for key, values in types.items():
            new_types[key] += list(values[start:position]) + [0] * len(piece)
        start = position + 1
    out += ids[start:]
    for key, values in types.items():
        new_types[key] += list(values[start:])
    return out, new_types


def marker_candidates(processor, used: set[int]) -> list[tuple[int, str]]:
    """Special tokens that could stand in for a text: not a media token, not one of ``used`` (ids the
    template and processor emit), bos/eos never; pad and unk last."""
    tokenizer = getattr(processor, "tokenizer", processor)
    media = media_literals(processor)
    named = {tokenizer.pad_token, tokenizer.unk_token}
    banned = {tokenizer.bos_token, tokenizer.eos_token} | media
    out = []
    for token_id, token in sorted(tokenizer.added_tokens_decoder.items()):
        if token.special and token.content not in banned and token_id not in used:
            if tokenizer(token.content, add_special_tokens=False)["input_ids"] == [token_id]:
                out.append((token_id, token.content))
    return sorted(out, key=lambda c: c[1] in named)


def no_marker() -> ControlTokenError:
    return ControlTokenError("this tokenizer has no spare special token to escape control-token text in data "
                             "with; set data.special_tokens=error to find such rows, or clean the data")
