"""Prefix-shared pair log-probs: each pair's prompt runs through the language model once.

Chosen and rejected share the prompt (and its images). :func:`mpo.train.logprobs.pair_logps` already runs
the vision tower once per pair, but the language model still sees the prompt twice, in the rows
``prompt+chosen`` and ``prompt+rejected``. With long prompts (256+ visual tokens per image) and short
answers that is nearly half of the step. Prefix sharing (Wang et al., "Accelerating Direct
Preference Optimization with Prefix Sharing", arXiv 2410.20305) packs each pair into ONE sequence

    [prompt (P tokens) | chosen (C) | rejected (R)]            one row per pair, right-padded to W

with a 4-D attention mask in which every token attends causally to the tokens before it, except that
rejected tokens do not see the chosen ones: rejected attends to the prompt and to itself, exactly as
in its own row. Rotary positions follow the same rule: the prompt's are the model's own multimodal
(M-RoPE, ``[3, B, W]``) positions from ``get_rope_index``; chosen and rejected both continue from the
prompt's largest position + 1 on all three axes (how ``get_rope_index`` numbers text after an
image). Attention is causal, so every prompt hidden state is what either unshared row computes, and
each response token's hidden state sees the same keys, values and positions as in its own row: the
log-probs (and their gradients, which flow into the prompt once from both responses) are the
unshared ones up to float rounding (tested to 1e-5). The first rejected token is predicted from the
prompt's last position, whose logits are shared with the first chosen token.

The batch is the ordinary pair batch of :class:`mpo.train.collate.PairCollator` (rows ``[0, B)`` chosen,
``[B, 2B)`` rejected); packing happens here, and the result is a :class:`mpo.train.logprobs.PairLogps` in
that batch's layout, so callers cannot tell the paths apart. Everything runs inside the (possibly
DDP / DeepSpeed / PEFT-wrapped) model's own ``__call__``, once per batch, after the one vision encode
on the unwrapped model that :func:`mpo.train.logprobs.pair_logps` also does: gradient checkpointing, LoRA,
DDP and ZeRO-2/3 see one ordinary forward.

Where the model cannot take this (an attention implementation without custom 4-D masks such as
``flash_attention_2``, sliding-window layers, a model without ``get_rope_index``, a transformers
that rebuilds a given 4-D mask), :func:`choose_pair_forward` falls back to the unshared path and
says why. The check is a feature test of the installed transformers, not a version compare.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mpo.chat import PER_TOKEN, mrope_positions
from mpo.train import logprobs
from mpo.train.logprobs import PairLogps, image_features, pair_logps, unwrap

MASKED_ATTENTION = ("sdpa", "eager")  # the implementations that take a custom 4-D mask


@dataclass
class PackedPairs:
    """B pairs packed one per row. ``input_ids`` and ``valid`` [B, W]; ``prompt``, ``chosen``,
    ``rejected`` [B, 1] segment lengths P, C, R (row length P + C + R <= W)."""

    input_ids: torch.Tensor
    valid: torch.Tensor
    prompt: torch.Tensor
    chosen: torch.Tensor
    rejected: torch.Tensor

    def segments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Column index [1, W] and the boolean [B, W] masks of the prompt, chosen and rejected parts."""
        k = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)[None]
        end_chosen = self.prompt + self.chosen
        in_chosen = (k >= self.prompt) & (k < end_chosen)
        in_rejected = (k >= end_chosen) & (k < end_chosen + self.rejected)
        return k, k < self.prompt, in_chosen, in_rejected


def _segment_lengths(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """P, C, R [B, 1] of a pair batch, checked: same prompt in both rows, one response run per row."""
    ids, response = batch["input_ids"], batch["response_mask"].bool()
    b = ids.shape[0] // 2
    counts = response.sum(dim=1)
    starts = response.int().argmax(dim=1)
    if bool((counts == 0).any()):
        raise ValueError("every row of a pair batch needs at least one response token")
    if not torch.equal(starts[:b], starts[b:]):
        raise ValueError("chosen and rejected rows of a pair have prompts of different lengths")
    columns = torch.arange(ids.shape[1], device=ids.device)
    if not bool(((ids[:b] == ids[b:]) | (columns >= starts[:b, None])).all()):
        raise ValueError("chosen and rejected rows of a pair have different prompts")
    if not torch.equal(batch["attention_mask"].sum(dim=1), starts + counts):
        raise ValueError("a pair batch row must be prompt + response, right-padded")
    return starts[:b, None], counts[:b, None], counts[b:, None]


def pack_pairs(batch: dict, pad_id: int) -> PackedPairs:
    """``input_ids`` [2B, T] of a pair batch -> [B, W] rows ``prompt | chosen | rejected | pad``."""
    ids = batch["input_ids"]
    b = ids.shape[0] // 2
    prompt, chosen, rejected = _segment_lengths(batch)
    width = int((prompt + chosen + rejected).max())
    k = torch.arange(width, device=ids.device)[None]
    from_rejected = k >= prompt + chosen
    pair = torch.arange(b, device=ids.device)[:, None]
    rows = torch.where(from_rejected, pair + b, pair)
    columns = torch.where(from_rejected, k - chosen, k).clamp(max=ids.shape[1] - 1)
    valid = k < prompt + chosen + rejected
    return PackedPairs(ids[rows, columns].masked_fill(~valid, pad_id), valid, prompt, chosen, rejected)


def pair_attention_mask(packed: PackedPairs, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, W, W] mask: causal over real keys, rejected queries blind to chosen keys. Boolean (True =
    attend) for sdpa, additive (0 / dtype's min) for eager. Padded queries see every real key before
    them, so no row is empty (an empty row would make sdpa return NaN)."""
    _, _, in_chosen, in_rejected = packed.segments()
    k = torch.arange(packed.input_ids.shape[1], device=packed.valid.device)
    causal = k[None, :] <= k[:, None]
    allowed = causal[None] & packed.valid[:, None, :] & ~(in_rejected[:, :, None] & in_chosen[:, None, :])
    allowed = allowed[:, None]
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def packed_positions(model, packed: PackedPairs, image_grid_thw) -> torch.Tensor:
    """Rotary positions of the packed rows: [3, B, W] M-RoPE ids (the model's ``get_rope_index`` on the
    prompt; both responses from the prompt's largest position + 1), or [B, W] for a 1-D RoPE model."""
    k, in_prompt, in_chosen, in_rejected = packed.segments()
    offset = torch.where(in_chosen, k - packed.prompt, k - packed.prompt - packed.chosen)
    response = in_chosen | in_rejected
    base = mrope_positions(unwrap(model), packed.input_ids, packed.valid.long(), image_grid_thw)
    if base is None:
        return torch.where(response, packed.prompt + offset, k.expand_as(response))
    start = base.masked_fill(~in_prompt[None], -1).amax(dim=(0, 2)) + 1  # [B]
    return torch.where(response[None], (start[:, None] + offset)[None], base)


def _kept_positions(packed: PackedPairs, response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which packed positions need logits, and for each response token of the pair batch (in
    ``response_mask`` order, [N]) the index of its predicting position among the kept ones.

    keep [B, W]: the prompt's last position (predicts chosen[0] AND rejected[0]), chosen positions but
    its last, rejected positions but its last."""
    k, _, in_chosen, in_rejected = packed.segments()
    last_prompt = k == packed.prompt - 1
    keep = last_prompt | (in_chosen & (k < packed.prompt + packed.chosen - 1))
    keep |= in_rejected & (k < packed.prompt + packed.chosen + packed.rejected - 1)
    index = (keep.flatten().cumsum(0) - 1).view(keep.shape)
    b, t = packed.prompt.shape[0], response_mask.shape[1]
    column = torch.arange(t, device=keep.device)[None]
    prompt, chosen = packed.prompt.repeat(2, 1), packed.chosen.repeat(2, 1)
    rejected_row = (torch.arange(2 * b, device=keep.device) >= b)[:, None]
    # token at column t of its unshared row <- packed position t-1 (chosen; rejected's first token),
    # or t + C - 1 (rejected's later tokens, which sit C places further right in the packed row)
    source = torch.where(rejected_row & (column != prompt), column + chosen - 1, column - 1)
    source = source.clamp(0, keep.shape[1] - 1)
    pair = torch.arange(2 * b, device=keep.device)[:, None] % b
    return keep, index[pair, source][response_mask]


def _pad_id(model) -> int:
    """A token id for packed padding (never attended to, never an image or video placeholder, which
    the model would count): the model's pad, else its eos, else 0."""
    config = unwrap(model).config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    media = {getattr(config, "image_token_id", None), getattr(config, "video_token_id", None)}
    for source in (text, config):
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(source, name, None)
            value = value[0] if isinstance(value, (list, tuple)) and value else value
            if isinstance(value, int) and value not in media:
                return value
    return 0


def shared_pair_logps(model, batch: dict) -> PairLogps:
    """:func:`mpo.train.logprobs.pair_logps` with each prompt computed once (see the module docstring).

    ``batch``: the pair batch of :class:`mpo.train.collate.PairCollator` (``input_ids``,
    ``attention_mask``, ``response_mask`` [2B, T]; optional ``pixel_values`` [P, C] and
    ``image_grid_thw`` [I, 3], each pair's images once). Returns ``PairLogps`` over [2B, T]."""
    inner = unwrap(model)
    response_mask = batch["response_mask"].bool()
    if response_mask[:, 0].any():
        raise ValueError("a response cannot start at position 0 (it needs a prompt token before it)")
    packed = pack_pairs(batch, _pad_id(model))
    kwargs, grid = {}, batch.get("image_grid_thw")
    if batch.get("pixel_values") is not None:  # once: one packed row, one prompt, per pair
        images = {k: v for k, v in batch.items() if k not in logprobs.BATCH_KEYS and k not in PER_TOKEN}
        kwargs["mm_encoder_outputs"] = {"image": image_features(model, images)}
    dtype = inner.get_input_embeddings().weight.dtype
    mask = pair_attention_mask(packed, inner.config._attn_implementation, dtype)
    keep, index = _kept_positions(packed, response_mask)
    columns = None if logprobs._MASK_KEEP else keep.any(dim=0).nonzero().squeeze(-1)
    out = model(
        input_ids=packed.input_ids,
        attention_mask=mask,
        position_ids=packed_positions(model, packed, grid),
        logits_to_keep=keep if columns is None else columns,
        use_cache=False,
        **kwargs,
    )
    logits = (out.logits if columns is None else out.logits[keep[:, columns]]).float()  # [K, V]
    targets = batch["input_ids"][response_mask]
    flat = logits[index, targets] - torch.logsumexp(logits, dim=-1)[index]
    token_logps = torch.zeros(response_mask.shape, dtype=flat.dtype, device=flat.device)
    token_logps = token_logps.masked_scatter(response_mask, flat)
    return PairLogps(token_logps=token_logps, response_mask=response_mask, sums=token_logps.sum(dim=-1))


# ---------------------------------------------------------------------------------------------
# Choosing the path: the switch (train.share_prompt), a feature test, and the padding each path pays.


def _mask_passes_through(text_config) -> bool:
    """Whether this transformers hands a given 4-D mask to the attention layers as it is."""
    try:
        from transformers.masking_utils import create_causal_mask

        mask = torch.ones(1, 1, 2, 2, dtype=torch.bool)
        return create_causal_mask(text_config, torch.zeros(1, 2, 1), mask, None) is mask
    except (ImportError, TypeError, ValueError, AttributeError):
        return False


def shared_prefix_support(model) -> str | None:
    """Why ``model`` cannot take the prefix-shared forward here, or None when it can."""
    inner = unwrap(model)
    config = inner.config
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in MASKED_ATTENTION:
        return f"attention implementation {implementation!r} takes no custom 4-D mask (sdpa and eager do)"
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if "sliding_attention" in (getattr(text, "layer_types", None) or ()):
        return "the model has sliding-window layers (one 4-D mask cannot serve them)"
    if not hasattr(getattr(inner, "model", None), "get_rope_index"):
        return f"{type(inner).__name__} has no get_rope_index (Qwen-VL multimodal rotary positions)"
    if not _mask_passes_through(text):
        return "this transformers' create_causal_mask does not pass a given 4-D attention mask through"
    return None


@dataclass(frozen=True)
class PairForward:
    """The pair forward a run uses: ``shared`` (prefix-shared) or not, and why not."""

    shared: bool
    reason: str = ""

    def __call__(self, model, batch: dict) -> PairLogps:
        return shared_pair_logps(model, batch) if self.shared else pair_logps(model, batch)

    def describe(self) -> str:
        return "shared prompt (one packed row per pair)" if self.shared else f"unshared ({self.reason})"

    def padding(self, batch: dict) -> torch.Tensor:
        """``[tokens, slots, 1]`` (float64) this path puts through the language model for ``batch``:
        real tokens, rows x row width (slots - tokens is padding), one micro-batch."""
        attention, response = batch["attention_mask"], batch["response_mask"]
        if self.shared:
            b = attention.shape[0] // 2
            lengths = attention[:b].sum(dim=1) + response[b:].sum(dim=1)
            tokens, slots = lengths.sum(), b * lengths.max()
        else:
            tokens, slots = attention.sum(), torch.tensor(attention.numel(), device=attention.device)
        return torch.stack([tokens, slots, torch.ones_like(tokens)]).to(torch.float64)


def choose_pair_forward(model, share_prompt: bool) -> PairForward:
    """The shared forward when asked for and supported, else the unshared one with the reason."""
    if not share_prompt:
        return PairForward(False, "train.share_prompt is false")
    reason = shared_prefix_support(model)
    return PairForward(False, f"shared prompt not supported: {reason}") if reason else PairForward(True)
