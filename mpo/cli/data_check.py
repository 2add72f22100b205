"""``mpo data check FILE_OR_FOLDER [RECIPE]``: what a data set holds, read before GPUs are booked.

Every row is read as the loaders read it (:func:`mpo.data.scan`: shapes, ids, image counts, every
image opened and verified), and every bad row is listed, not only the first. Token lengths are
counted with the recipe's processor (its policy's, with the recipe's pixel budget; without a
recipe, or a recipe without a policy, the bundled Qwen2.5 tokenizer with the default budget) from
the text and the images' sizes: it tokenizes, it loads no model and decodes no pixels.

For preference pairs the length is prompt + the longer response (what ``train.max_length`` cuts);
for prompts it is the prompt, against the policy's limit (``rollout.max_model_len``, else its
``max_position_embeddings``).

A row whose text holds a special token's literal (``<|im_end|>``, ``<|image_pad|>``; see
:mod:`mpo.control_tokens`) is a bad row under ``data.special_tokens=error``; under ``escape`` (the
default) it is counted in a note: training and scoring tokenize that text as plain text.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

BINS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


@dataclass
class DataReport:
    source: str
    kind: str
    processor: str
    rows: int = 0
    shapes: Counter = field(default_factory=Counter)
    images: int = 0
    bad_rows: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    visual_tokens: list[int] = field(default_factory=list)
    limit: int = 0
    limit_name: str = ""
    escaped: list[str] = field(default_factory=list)  # rows whose control-token text is tokenized as plain text

    @property
    def over_limit(self) -> int:
        return sum(n > self.limit for n in self.lengths)

    def as_dict(self) -> dict:
        return {"source": self.source, "kind": self.kind, "processor": self.processor, "rows": self.rows,
                "shapes": dict(self.shapes), "images": self.images, "bad_rows": self.bad_rows,
                "tokens": _summary(self.lengths), "visual_tokens_per_image": _summary(self.visual_tokens),
                "limit": {self.limit_name: self.limit, "over": self.over_limit},
                "control_token_rows": len(self.escaped)}


def _summary(values: list[int]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    return {"min": ordered[0], "p50": ordered[len(ordered) // 2], "p95": ordered[min(len(ordered) - 1,
            int(0.95 * len(ordered)))], "max": ordered[-1], "mean": round(statistics.fmean(ordered), 1)}


def _encoder(recipe):
    """The recipe's processor (as rollout, scoring and training build it), or the bundled one."""
    from mpo.chat import ChatEncoder
    from mpo.models import model_folder, recipe_processor, stop_ids

    if recipe.model.policy:
        folder = model_folder(recipe.model.policy, "model.policy")
        return ChatEncoder(recipe_processor(folder, recipe.model), stop_ids(folder)), str(folder), folder
    from mpo.cli.tiny import build_processor, load_real_vocab_tokenizer

    processor = build_processor(load_real_vocab_tokenizer(), recipe.model.min_pixels, recipe.model.max_pixels)
    return ChatEncoder(processor), "the bundled Qwen2.5 tokenizer (no model.policy given)", None


def check_data(source: str | Path, recipe=None, kind: str | None = None) -> DataReport:
    """Read every row of ``source`` and report on it (see the module docstring)."""
    from mpo.config import load_recipe
    from mpo.data import guess_kind, scan
    from mpo.data.images import ImageError
    from mpo.models import max_positions

    recipe = recipe or load_recipe(None)
    kind = kind or guess_kind(source, recipe.data.split)
    encoder, described, folder = _encoder(recipe)
    report = DataReport(str(source), kind, described)
    if kind == "preferences":
        report.limit, report.limit_name = recipe.train.max_length, "train.max_length"
    else:
        report.limit = recipe.rollout.max_model_len or (max_positions(folder) if folder else 32768)
        report.limit_name = "rollout.max_model_len" if recipe.rollout.max_model_len else "max_position_embeddings"
    cache = Path(recipe.run.output_dir) / "image_cache"
    for row in scan(source, kind, recipe.data.image_root, image_cache=cache, split=recipe.data.split):
        report.rows += 1
        if row.shape:
            report.shapes[row.shape] += 1
        if row.problem:
            report.bad_rows.append(row.problem)
            continue
        record = row.record
        if _holds_control_token(report, encoder, recipe, row, kind):
            continue
        report.images += len(record.images)
        try:
            tokens = [encoder.visual_tokens(path) for path in record.images]
        except ImageError as err:  # e.g. an aspect ratio the resize refuses
            report.bad_rows.append(f"{row.where}: field 'images': {err}")
            continue
        report.visual_tokens += tokens
        # the text with one placeholder per image, plus each image's tokens beyond its placeholder
        length = encoder.prompt_length(record.messages) + sum(n - 1 for n in tokens)
        if kind == "preferences":
            length += max(len(ids) for ids in encoder.responses_ids([record.chosen, record.rejected]))
        report.lengths.append(length)
    return report


def _holds_control_token(report: DataReport, encoder, recipe, row, kind: str) -> bool:
    """Whether ``row`` is bad for holding a control token's text (``data.special_tokens=error``);
    under ``escape`` such a row is noted in ``report.escaped``."""
    from mpo import control_tokens as control

    record = row.record
    responses = {"chosen": record.chosen, "rejected": record.rejected} if kind == "preferences" else {}
    found = control.find(encoder.literals, record.messages, **responses)
    if found and recipe.data.special_tokens == "error":
        report.bad_rows.append(str(control.refusal(row.where, found)))
        return True
    if found:
        report.escaped.append(f"{row.where}: field {found[0]!r}: {found[1]!r}")
    return False


def format_report(report: DataReport) -> str:
    shapes = ", ".join(f"{name} {count}" for name, count in report.shapes.most_common()) or "none"
    tokens, visual = _summary(report.lengths), _summary(report.visual_tokens)
    lines = [
        f"{report.source}: {report.rows} rows of {report.kind} (shapes: {shapes})",
        f"  images: {report.images} in good rows"
        + (f"; visual tokens per image min {visual['min']}, mean {visual['mean']}, max {visual['max']}" if visual else ""),
        f"  tokens ({'prompt + longer response' if report.kind == 'preferences' else 'prompt'}, "
        f"{report.processor}):"
        + (f" p50 {tokens['p50']}, p95 {tokens['p95']}, max {tokens['max']}; {report.over_limit} over "
           f"{report.limit_name} {report.limit}" if tokens else " none"),
    ]
    counts = Counter(next((b for b in BINS if n <= b), None) for n in report.lengths)
    widest = max(counts.values(), default=0)
    low = 0
    for high in (*BINS, None):
        if counts.get(high):
            bar = "#" * max(1, round(40 * counts[high] / widest))
            label = f"{low + 1:>6}-{high:<6}" if high else f"{'>' + str(BINS[-1]):>13}"
            lines.append(f"    {label} {bar} {counts[high]}")
        low = high or low
    if report.escaped:
        lines.append(f"  control-token text: {len(report.escaped)} row(s) hold a special token's text, tokenized as "
                     f"plain text (data.special_tokens=escape; 'error' refuses them); first: {report.escaped[0]}")
    if report.bad_rows:
        lines.append(f"  bad rows ({len(report.bad_rows)}):")
        lines += [f"    {problem}" for problem in report.bad_rows[:50]]
        if len(report.bad_rows) > 50:
            lines.append(f"    ... and {len(report.bad_rows) - 50} more")
    return "\n".join(lines)
