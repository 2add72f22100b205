"""GRPO's completions sampled one row at a time, each under its own seed, so that what a row samples does
not depend on how the global batch is split over ranks.

TRL 1.16's transformers-``generate`` path (``GRPOTrainer._generate_single_turn``) samples all of a
rank's rows in one call from the rank's own torch generator (seeded per device), so two ranks sample
other completions than one process with the same global batch. :class:`RowSeededGeneration` calls
TRL's own method once per row, with that row's prompt ids and image inputs (:func:`row_inputs`),
inside :func:`mpo.rollout.base.seeded` with the seed :func:`row_seed` of (``args.seed``, the step,
the row's index in the global generation batch: ``process_index * rows per rank + i``). One row needs
no padding, so a row's completion is the same tokens whatever rows share its rank; TRL's end-of-sequence
masking is applied as it is. The trainer's generator is restored after each row, so a checkpoint
resumes to the weights an uninterrupted run ends at. vLLM (its own per-request seeds) and transformers'
continuous batching keep TRL's path. The price: one ``generate`` call per row instead of one per rank
(this path is for CPU runs and debugging; GPU runs sample with vLLM).
"""

from __future__ import annotations

from itertools import accumulate

from mpo.rollout.base import chunk_seed, seeded


def row_seed(seed: int, step: int, index: int) -> int:
    """The seed of row ``index`` of the global generation batch sampled before optimizer step
    ``step + 1`` (``state.global_step`` is ``step`` then)."""
    return chunk_seed(seed, "grpo", step, index)


def row_inputs(prompt_ids: list, images: list | None, fields: dict, i: int) -> tuple[list, list | None, dict]:
    """Row ``i``'s part of what ``GRPOTrainer._tokenize_prompts`` returned for a batch: its prompt ids,
    its images and its multimodal fields, as ``_tokenize_prompts`` returns them for that row alone.
    Per-token fields (a list of per-row lists) give the row's list; image fields are cut by the rows'
    image counts (Qwen-style ``pixel_values`` by ``image_grid_thw``, through TRL's
    ``split_pixel_values_by_grid``; one entry per image otherwise: LLaVA, Gemma 3, InternVL at one tile
    per image); a row without images gets no image fields. A field that fits none of these (tiles of
    unknown count per image) is a ValueError naming it: a trainer that knows its rows' own inputs
    overrides :meth:`RowSeededGeneration._row_inputs`."""
    from trl.trainer.utils import split_pixel_values_by_grid

    rows = len(prompt_ids)
    counts = [len(x) if x else 0 for x in images] if images is not None else [0] * rows
    bounds = [0, *accumulate(counts)]
    cut = {}
    if "image_grid_thw" in fields and "pixel_values" in fields:
        split = split_pixel_values_by_grid({**fields, "num_images": counts})
        cut = {key: split[key][i] for key in ("pixel_values", "image_grid_thw")}
    out = {}
    for key, value in fields.items():
        if key in cut:
            part = cut[key]
        elif isinstance(value, list) and len(value) == rows and all(isinstance(v, list) for v in value):
            part = [value[i]]  # per token
        elif len(value) == bounds[-1] and bounds[-1] > 0:
            part = value[bounds[i]:bounds[i + 1]]  # per image
        else:
            raise ValueError(f"GRPO generation: the processor's {key!r} ({len(value)} entries for {rows} rows, "
                             f"{bounds[-1]} images) cannot be cut per row")
        if len(part):
            out[key] = part
    return [prompt_ids[i]], None if images is None else [images[i]], out


class RowSeededGeneration:
    """A mixin above TRL's ``GRPOTrainer``: its non-vLLM generation row by row, each row under
    :func:`row_seed` (see the module docstring)."""

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if self.use_vllm or self.use_transformers_continuous_batching:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images)
        first = self.accelerator.process_index * len(prompt_ids)
        completions = []
        for i in range(len(prompt_ids)):
            ids, row_images, fields = self._row_inputs(prompt_ids, images, multimodal_fields, i)
            with seeded(row_seed(self.args.seed, self.state.global_step, first + i), self.accelerator.device):
                completion, _ = super()._generate_single_turn(ids, row_images, fields, num_generations,
                                                              has_tool_images)
            completions.extend(completion)
        return completions, None

    def _row_inputs(self, prompt_ids, images, multimodal_fields, i):
        """Row ``i``'s ``(prompt_ids, images, multimodal_fields)``, as ``_tokenize_prompts`` would give
        them for that row alone: :func:`row_inputs`."""
        return row_inputs(prompt_ids, images, multimodal_fields, i)
