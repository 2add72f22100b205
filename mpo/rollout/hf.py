"""The ``hf`` rollout engine: transformers ``generate`` in batches of prompts (left padding, images,
several samples per prompt with ``num_return_sequences``), for CPU runs and debugging; see
:mod:`mpo.rollout` for the interface both engines share."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mpo.records import Prompt, Rollout
from mpo.rollout.base import Backend, RolloutError, seeded

if TYPE_CHECKING:
    pass


class HFBackend(Backend):
    """transformers ``generate``; see the module docstring."""

    name = "hf"

    def __init__(self, rollout_config, model_config, policy_dir, batch_size: int = 8, device: str | None = None):
        super().__init__(rollout_config, model_config, policy_dir)
        import torch

        if batch_size < 1:
            raise RolloutError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = self.processor = self.encoder = None
        self._load(self.policy_dir)

    def _load(self, policy_dir: Path) -> None:
        import torch
        from transformers import AutoModelForImageTextToText

        from mpo.models import recipe_processor

        mc = self.model_config
        processor = recipe_processor(policy_dir, mc)
        model = AutoModelForImageTextToText.from_pretrained(
            policy_dir, dtype=getattr(torch, mc.dtype), attn_implementation=mc.attn_implementation,
            trust_remote_code=mc.trust_remote_code, use_safetensors=True,
        ).to(self.device).eval()
        self._use(model, processor)

    def _use(self, model, processor) -> None:
        """Generate with ``model`` (on :attr:`device`, in eval mode) and ``processor`` from now on."""
        from mpo.chat import ChatEncoder

        self.model, self.processor = model, processor
        self.eos_ids = _eos_ids(self.model.generation_config, getattr(self.processor, "tokenizer", self.processor))
        self.encoder = ChatEncoder(self.processor, self.eos_ids)
        tokenizer = self.encoder.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]

    def _refresh(self, policy_dir: Path) -> None:
        self.model = None  # free the old weights before loading the new ones
        self._load(policy_dir)

    @property
    def closed(self) -> bool:
        return self.model is None

    def sleep(self) -> None:
        if self.model is not None and self.device.startswith("cuda"):
            import torch

            self.model.to("cpu")
            torch.cuda.empty_cache()

    def wake(self) -> None:
        if self.model is not None and self.device.startswith("cuda"):
            self.model.to(self.device)

    def close(self) -> None:
        self.model = self.processor = self.encoder = None

    def generate(self, prompts, num_samples=None, seed=None) -> list[Rollout]:
        if self.closed:
            raise RolloutError("backend is closed")
        n, seed = self._resolve(num_samples, seed)
        out: list[Rollout] = []
        with seeded(seed, self.device):
            for start in range(0, len(prompts), self.batch_size):
                out.extend(self._generate_batch(prompts[start:start + self.batch_size], n))
        return out

    def generation_config(self, n: int):
        """Exactly the recipe's sampling: every knob that a checkpoint's ``generation_config.json``
        could fill in (transformers merges it into unset fields) is set here."""
        from transformers import GenerationConfig

        cfg = self.config
        greedy = cfg.temperature == 0
        return GenerationConfig(
            do_sample=not greedy,
            temperature=1.0 if greedy else cfg.temperature,
            top_p=1.0 if greedy else cfg.top_p,
            top_k=0,
            min_p=0.0,
            typical_p=1.0,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            num_beams=1,
            max_new_tokens=cfg.max_tokens,
            min_new_tokens=0,
            num_return_sequences=1 if greedy else n,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
        )

    def _generate_batch(self, prompts: Sequence[Prompt], n: int) -> list[Rollout]:
        import torch

        inputs = self._collate([self.encoder.encode_prompt(p.messages, p.images) for p in prompts])
        gen_config = self.generation_config(n)
        with torch.no_grad():
            output = self.model.generate(**inputs, generation_config=gen_config)
        new_tokens = output[:, inputs["input_ids"].shape[1]:].tolist()
        copies = n // gen_config.num_return_sequences  # greedy: one sequence, n identical copies
        rollouts = []
        for i, prompt in enumerate(prompts):
            for k in range(n):
                row = new_tokens[i * gen_config.num_return_sequences + k // copies]
                rollouts.append(self._rollout(prompt, k, row))
        return rollouts

    def _rollout(self, prompt: Prompt, sample_idx: int, tokens: list[int]) -> Rollout:
        stop = next((i for i, t in enumerate(tokens) if t in self.eos_ids), None)
        kept = tokens if stop is None else tokens[:stop]
        return Rollout(
            prompt_id=prompt.prompt_id,
            sample_idx=sample_idx,
            response=self.encoder.response_text(self.encoder.tokenizer.decode(kept, skip_special_tokens=True)),
            num_tokens=len(tokens) if stop is None else stop + 1,
            finish_reason="length" if stop is None else "stop",
            policy=self.policy,
        )

    def _collate(self, encodings) -> dict:
        """Left-pad prompt ids and their per-token types (0 on padding); concatenate the prompts'
        per-image tensors (whatever the family's processor returns) in order."""
        import torch

        width = max(len(e.input_ids) for e in encodings)
        ids = torch.full((len(encodings), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encodings), width), dtype=torch.long)
        types = {k: torch.zeros((len(encodings), width), dtype=torch.long) for e in encodings for k in e.token_types}
        for row, enc in enumerate(encodings):
            ids[row, width - len(enc.input_ids):] = torch.tensor(enc.input_ids)
            mask[row, width - len(enc.input_ids):] = 1
            for key, values in enc.token_types.items():
                types[key][row, width - len(values):] = torch.tensor(values)
        batch = {"input_ids": ids, "attention_mask": mask, **types}
        for key in sorted({k for e in encodings for k in e.vision}):
            batch[key] = torch.cat([e.vision[key] for e in encodings if key in e.vision])
        dtype = self.model.dtype
        return {k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device)) for k, v in batch.items()}


def _eos_ids(generation_config, tokenizer) -> list[int]:
    """End-of-sequence ids: the checkpoint's generation config, else the tokenizer's eos."""
    from mpo.models import eos_list

    eos = getattr(generation_config, "eos_token_id", None)
    ids = eos_list(tokenizer.eos_token_id if eos is None else eos)
    if not ids:
        raise RolloutError("the policy has no end-of-sequence token (generation_config or tokenizer)")
    return ids

