"""The hf rollout backend on the tiny policy: record fields, seeding, refresh, greedy == generate.

Real transformers models and the bundled PNGs; nothing mocked. What it does not check: sampling
quality (the tiny model is random) or the vllm backend (tests/vllm_engine)."""

from __future__ import annotations

import pytest
import torch

from mpo.cli.tiny import TINY_MAX_PIXELS, TINY_MIN_PIXELS, save_policy
from mpo.config import ModelConfig, RolloutConfig
from mpo.errors import MpoError
from mpo.records import Prompt, Rollout
from mpo.rollout import make_backend
from mpo.rollout.base import RolloutError, policy_label
from mpo.rollout.hf import HFBackend

MODEL = ModelConfig(dtype="float32", min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS)


def _config(**kw) -> RolloutConfig:
    return RolloutConfig(**{"backend": "hf", "num_samples": 3, "temperature": 1.0, "max_tokens": 8, **kw})


@pytest.fixture(scope="module")
def prompts(mixed_prompts) -> list[Prompt]:
    return mixed_prompts


@pytest.fixture(scope="module")
def backend(tiny_policy_dir):
    with make_backend(_config(), MODEL, tiny_policy_dir, batch_size=4) as hf:
        yield hf


def _key(rollouts: list[Rollout]) -> list[tuple]:
    return [(r.prompt_id, r.sample_idx, r.response, r.num_tokens, r.finish_reason) for r in rollouts]


def test_generate_fields(backend, prompts, tiny_policy_dir):
    assert isinstance(backend, HFBackend)
    rollouts = backend.generate(prompts, num_samples=3, seed=0)
    assert len(rollouts) == 3 * len(prompts)
    assert [r.prompt_id for r in rollouts] == [p.prompt_id for p in prompts for _ in range(3)]
    assert [r.sample_idx for r in rollouts] == [0, 1, 2] * len(prompts)
    for r in rollouts:
        assert 1 <= r.num_tokens <= 8
        assert r.finish_reason in ("stop", "length")
        assert (r.finish_reason == "length") == (r.num_tokens == 8) or r.finish_reason == "stop"
        assert r.policy == policy_label(tiny_policy_dir) == f"{tiny_policy_dir.parent.name}/policy"
        assert isinstance(r.response, str)
    # a random model rarely stops within 8 tokens: most rows run out of length
    assert any(r.finish_reason == "length" for r in rollouts)
    # samples of one prompt differ (temperature 1 over a 1k vocabulary)
    first = [r.response for r in rollouts[:3]]
    assert len(set(first)) > 1


def test_seeded_runs_reproduce_and_seeds_differ(backend, prompts):
    state = torch.random.get_rng_state()
    a = backend.generate(prompts, num_samples=2, seed=7)
    b = backend.generate(prompts, num_samples=2, seed=7)
    c = backend.generate(prompts, num_samples=2, seed=8)
    assert _key(a) == _key(b)
    assert _key(a) != _key(c)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone


def test_default_count_and_seed_from_config(backend, prompts):
    rollouts = backend.generate(prompts[:2])
    assert len(rollouts) == 2 * backend.config.num_samples
    assert _key(rollouts) == _key(backend.generate(prompts[:2], seed=backend.config.seed))
    with pytest.raises(RolloutError, match="num_samples"):
        backend.generate(prompts[:1], num_samples=0)


def test_greedy_equals_model_generate(tiny_policy_dir, prompts):
    """temperature 0: every sample is the greedy continuation, the same as generate(do_sample=False)
    on the prompt alone (no padding), token for token."""
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration


    hf = make_backend(_config(temperature=0.0, max_tokens=10), MODEL, tiny_policy_dir, batch_size=6)
    rollouts = hf.generate(prompts, num_samples=2)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_policy_dir).eval()
    eos = model.generation_config.eos_token_id
    for i, prompt in enumerate(prompts):
        enc = hf.encoder.encode_prompt(prompt.messages, prompt.images)
        ids = torch.tensor([enc.input_ids])
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), **enc.vision,
                generation_config=GenerationConfig(do_sample=False, max_new_tokens=10, eos_token_id=eos,
                                                   pad_token_id=model.generation_config.pad_token_id),
            )
        tokens = out[0, ids.shape[1]:].tolist()
        stop = next((j for j, t in enumerate(tokens) if t in eos), None)
        expected = hf.encoder.tokenizer.decode(tokens[:stop], skip_special_tokens=True)
        pair = rollouts[2 * i: 2 * i + 2]
        assert [r.response for r in pair] == [expected, expected], prompt.prompt_id
        assert pair[0].num_tokens == (len(tokens) if stop is None else stop + 1)


def test_refresh_loads_the_new_checkpoint(tmp_path, prompts):
    """After refresh the backend samples exactly as a fresh backend on the new folder does."""
    old = save_policy(tmp_path / "round_000" / "policy", seed=0)
    new = save_policy(tmp_path / "round_001" / "policy", seed=5)
    config = _config(temperature=0.0, max_tokens=6)
    hf = make_backend(config, MODEL, old, batch_size=6)
    before = hf.generate(prompts, num_samples=1)
    assert {r.policy for r in before} == {"round_000/policy"}
    hf.refresh(new)
    after = hf.generate(prompts, num_samples=1)
    assert {r.policy for r in after} == {"round_001/policy"}
    fresh = make_backend(config, MODEL, new, batch_size=6).generate(prompts, num_samples=1)
    assert _key(after) == _key(fresh)
    assert _key(after) != _key(before)
    model = hf.model
    hf.refresh(new)  # the folder already served: nothing reloaded
    assert hf.model is model
    with pytest.raises(MpoError, match="missing: no such folder"):
        hf.refresh(tmp_path / "missing")
    hf.close()
    with pytest.raises(RolloutError, match="closed"):
        hf.generate(prompts[:1], num_samples=1)


def test_bad_policy_folder_and_backend(tmp_path):
    with pytest.raises(MpoError, match="nothing: no such folder"):
        make_backend(_config(), MODEL, tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MpoError, match="empty: not a model folder \\(no config.json\\)"):
        make_backend(_config(), MODEL, tmp_path / "empty")
