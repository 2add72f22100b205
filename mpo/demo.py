"""``mpo demo``: the toolkit's built-in default run, on CPU, on tiny models it builds itself.

What it does today: builds a tiny policy and a tiny reward model (Skywork layout) offline, loads the
bundled colour prompts (real PNGs checked up front), encodes each through ``mpo.chat`` and samples
one response per prompt with the policy. The scoring, pair-building and MPO stages join as their
issues land (reward model, trainer, round loop); until then it says so rather than pretending.
"""

from __future__ import annotations

import time
from pathlib import Path

from mpo.tiny import ASSETS

DEMO_PROMPTS = ASSETS / "demo" / "prompts.jsonl"


def run_demo(out_dir: str | Path, seed: int = 0, max_new_tokens: int = 12) -> list[str]:
    import torch
    from tqdm import tqdm
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from mpo.chat import ChatEncoder
    from mpo.data import load_prompts
    from mpo.tiny import save_policy, save_reward_model

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    out = Path(out_dir)
    start = time.perf_counter()
    policy_dir = out / "models" / "policy"
    reward_dir = out / "models" / "reward"
    if not (policy_dir / "config.json").exists():
        save_policy(policy_dir, seed)
    if not (reward_dir / "value_head.safetensors").exists():
        save_reward_model(reward_dir, seed + 1)
    print(f"tiny policy: {policy_dir}\ntiny reward model: {reward_dir}")

    prompts = load_prompts(DEMO_PROMPTS).records
    processor = AutoProcessor.from_pretrained(policy_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(policy_dir).eval()
    encoder = ChatEncoder(processor)
    torch.manual_seed(seed)
    responses = []
    for prompt in tqdm(prompts, desc="rollout (hf)"):
        encoded = encoder.encode_prompt(prompt.messages, prompt.images)
        ids = torch.tensor([encoded.input_ids])
        with torch.no_grad():
            generated = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), **encoded.vision,
                do_sample=True, temperature=1.0, max_new_tokens=max_new_tokens,
            )
        responses.append(processor.tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True))
    for prompt, response in list(zip(prompts, responses))[:4]:
        print(f"  {prompt.prompt_id:10s} -> {response!r}")
    print(
        f"{len(prompts)} prompts rolled out in {time.perf_counter() - start:.1f}s. "
        "Scoring, pairs and MPO rounds are not wired into the demo yet (see the open issues)."
    )
    return responses
