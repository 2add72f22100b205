"""A GRPO batch cut into rows and rows put back together: how the Selective Sample Buffer
(:mod:`mpo.grpo.ssb`) carries a completion from the step that sampled it to a later batch.

A batch is what TRL 1.16's ``GRPOTrainer._generate_and_score_completions`` returns: per row, the prompt's
token ids and mask (padded on the left), the completion's ids and mask and per-token values such as the
reference's log-probs (padded on the right), per-token type ids over prompt and completion
(``mm_token_type_ids``: both paddings), the advantage, and the row's image inputs (``pixel_values`` and
their grid, ``num_images``, ...); plus ``num_items_in_batch``, a count over the whole global batch.

- :func:`split_rows`: one dict per row, image inputs cut per row by TRL's own
  ``split_pixel_values_by_grid`` (so every family TRL splits is split the same way), tensors kept at
  the batch's padded width;
- :func:`join_rows`: rows, from one batch or several, back into a batch: prompt-side tensors padded
  on the left and completion-side ones on the right to the widest row, image inputs merged by TRL's
  ``unsplit_pixel_values_by_grid``. ``num_items_in_batch`` is not a row's: the trainer recounts it
  (the completion tokens of the global batch) after replacing rows.

Padding is masked out (attention mask 0, loss mask 0), so a row's log-probs and loss terms do not
depend on the batch it is joined into beyond float rounding (``tests/model/test_grpo_rows.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

PROMPT_SIDE = ("prompt_ids", "prompt_mask")  # padded on the left
COMPLETION_SIDE = ("completion_ids", "completion_mask", "ref_per_token_logps", "old_per_token_logps",
                   "sampling_per_token_logps", "tool_mask")  # padded on the right
BOTH_SIDES = ("mm_token_type_ids", "token_type_ids")  # prompt width, then completion width
BATCH_WIDE = ("num_items_in_batch",)


def split_rows(batch: dict) -> list[dict]:
    """The rows of a GRPO batch (see the module docstring), each a dict of the batch's keys but
    :data:`BATCH_WIDE` ones."""
    from trl.trainer.utils import split_pixel_values_by_grid

    batch = split_pixel_values_by_grid(batch)
    size = len(batch["prompt_ids"])
    rows = [{} for _ in range(size)]
    for key, value in batch.items():
        if key in BATCH_WIDE or value is None or (torch.is_tensor(value) and value.ndim == 0):
            continue
        if len(value) != size:
            raise ValueError(f"batch key {key!r}: {len(value)} entries for {size} rows")
        for row, entry in zip(rows, value):
            row[key] = entry
    return rows


def _pad(values: Sequence[torch.Tensor], width: int, fill, left: bool) -> torch.Tensor:
    padded = []
    for value in values:
        extra = value.new_full((width - value.shape[0], *value.shape[1:]), fill)
        padded.append(torch.cat([extra, value] if left else [value, extra]))
    return torch.stack(padded)


def join_rows(rows: Sequence[dict], pad_token_id: int) -> dict:
    """Rows (all with the same keys) as one batch, padded to the widest row; without
    ``num_items_in_batch`` (see the module docstring)."""
    from trl.trainer.utils import unsplit_pixel_values_by_grid

    if not rows:
        raise ValueError("join_rows: no rows")
    keys = list(rows[0])
    if any(list(row) != keys for row in rows):
        raise ValueError("join_rows: rows with different keys")
    prompt_widths = [row["prompt_ids"].shape[0] for row in rows]
    completion_widths = [row["completion_ids"].shape[0] for row in rows]
    width_p, width_c = max(prompt_widths), max(completion_widths)
    batch = {}
    for key in keys:
        values = [row[key] for row in rows]
        fill = pad_token_id if key in ("prompt_ids", "completion_ids") else 0
        if key in PROMPT_SIDE:
            batch[key] = _pad(values, width_p, fill, left=True)
        elif key in COMPLETION_SIDE:
            batch[key] = _pad(values, width_c, fill, left=False)
        elif key in BOTH_SIDES:
            heads = _pad([v[:p] for v, p in zip(values, prompt_widths)], width_p, 0, left=True)
            tails = _pad([v[p:] for v, p in zip(values, prompt_widths)], width_c, 0, left=False)
            batch[key] = torch.cat([heads, tails], dim=1)
        elif torch.is_tensor(values[0]) and key not in ("pixel_values", "image_grid_thw", "image_position_ids",
                                                        "pixel_attention_mask", "spatial_shapes", "image_sizes"):
            if len({tuple(v.shape) for v in values}) > 1:
                raise ValueError(f"join_rows: key {key!r} has rows of different shapes; add it to a side")
            batch[key] = torch.stack(values)
        else:
            batch[key] = list(values)
    return unsplit_pixel_values_by_grid(batch)
