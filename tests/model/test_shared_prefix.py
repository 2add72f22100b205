"""The prefix-shared pair forward (:mod:`mpo.train.shared_prefix`) against the unshared one, on a tiny
Qwen2.5-VL (CPU, fp32, real images).

:func:`mpo.train.logprobs.pair_logps` is pinned to one full forward per sequence in
``test_collate_logprobs.py``; here the shared forward is pinned to it: per-sequence log-prob sums
and per-token log-probs to 1e-5, and every parameter's gradient to 1e-5 relative (the error's norm
over the gradient's norm, per parameter tensor; elementwise to 1e-5 of the tensor's largest entry),
on image-heavy (256 visual tokens an image), multi-image, text-only and mixed batches, with sdpa and
eager attention, with LoRA and with gradient checkpointing. Then the switch end to end: ``mpo
train`` with ``train.share_prompt`` on and off logs the same losses, and reports its padding.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mpo.chat import ChatEncoder
from mpo.records import PreferencePair
from mpo.train.collate import PairCollator, PairDataset, pad_token_id
from mpo.train.logprobs import pair_logps
from mpo.train.shared_prefix import (
    choose_pair_forward,
    pack_pairs,
    pair_attention_mask,
    shared_pair_logps,
    shared_prefix_support,
)

REPO = Path(__file__).resolve().parents[2]
BIG_IMAGE = 448 * 448  # 32 x 32 patches of 14 -> 256 visual tokens after the 2 x 2 merge


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    """Real PNGs: two of 448x448 (256 visual tokens each), one 448x224, one 300x200."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, (width, height) in enumerate([(448, 448), (448, 448), (448, 224), (300, 200)]):
        pixels = np.random.default_rng(i).integers(0, 255, (height, width, 3), dtype=np.uint8)
        paths.append(str(folder / f"noise_{i}.png"))
        Image.fromarray(pixels).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def processor(tiny_policy_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_policy_dir, size={"shortest_edge": 3136, "longest_edge": BIG_IMAGE})


def _model(policy_dir, attention="sdpa"):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(
        policy_dir, dtype=torch.float32, attn_implementation=attention
    )


@pytest.fixture(scope="module")
def model(tiny_policy_dir):
    return _model(tiny_policy_dir)


def _ask(images: int, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}]


def _pairs(images: list[str]) -> dict[str, list[PreferencePair]]:
    big, big2, wide, small = images
    text = lambda t: [{"role": "user", "content": [{"type": "text", "text": t}]}]
    heavy = [
        PreferencePair("h0", _ask(1, "What colour is this image?"), [big], "red", "The image is green, I think."),
        PreferencePair("h1", _ask(1, "Name it."), [big2], "A square of noise.", "no"),
        PreferencePair("h2", _ask(1, "What is shown?"), [big], "same length", "equal sizes"),
    ]
    multi = [
        PreferencePair("m0", _ask(2, "Compare the two."), [big, wide], "The first is square.", "both"),
        PreferencePair("m1", _ask(3, "Which is widest?"), [small, wide, big2], "the second", "I cannot tell."),
    ]
    plain = [
        PreferencePair("t0", text("Say a colour."), [], "blue", "I will not say one today."),
        PreferencePair("t1", text("Count to three, please, slowly."), [], "one, two, three", "four"),
        PreferencePair("t2", text("Hi"), [], "hello there", "go away"),
    ]
    return {"image_heavy": heavy, "multi_image": multi, "text_only": plain,
            "mixed": [heavy[0], plain[0], multi[1], plain[1]]}


@pytest.fixture(scope="module")
def batches(images, processor) -> dict[str, dict]:
    encoder, collate = ChatEncoder(processor), PairCollator(pad_token_id(processor))
    out = {}
    for name, pairs in _pairs(images).items():
        dataset = PairDataset(pairs, encoder, max_length=4096)
        out[name] = collate([dataset[i] for i in range(len(dataset))])
    return out


KINDS = ["image_heavy", "multi_image", "text_only", "mixed"]


@pytest.fixture(params=["mask", "columns"])
def keep_mode(request, monkeypatch):
    """Both ways of keeping only response logits (boolean mask: transformers 5.2x; columns: 5.19)."""
    import mpo.train.logprobs

    if request.param == "mask" and not mpo.train.logprobs._accepts_mask_keep():
        pytest.skip("this transformers has no boolean logits_to_keep")
    monkeypatch.setattr(mpo.train.logprobs, "_MASK_KEEP", request.param == "mask")
    return request.param


def _assert_same_logps(shared, unshared):
    torch.testing.assert_close(shared.sums, unshared.sums, rtol=1e-5, atol=1e-5)
    assert torch.equal(shared.response_mask, unshared.response_mask)
    torch.testing.assert_close(shared.token_logps, unshared.token_logps, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_logps_equal_unshared_forward(model, batches, kind, keep_mode):
    batch = batches[kind]
    if kind == "image_heavy":
        assert (batch["image_grid_thw"].prod(dim=-1) // 4 >= 256).all()  # 256+ visual tokens an image
    _assert_same_logps(shared_pair_logps(model, batch), pair_logps(model, batch))


@torch.no_grad()
def test_eager_attention_takes_the_additive_mask(tiny_policy_dir, batches):
    eager = _model(tiny_policy_dir, "eager").eval()
    assert shared_prefix_support(eager) is None
    _assert_same_logps(shared_pair_logps(eager, batches["mixed"]), pair_logps(eager, batches["mixed"]))


def _objective_grads(model, batch, forward) -> dict[str, torch.Tensor]:
    """Gradients of an MPO-shaped objective: every row's sum with its own weight, plus the chosen
    tokens' mean (the SFT term)."""
    model.zero_grad(set_to_none=True)
    out = forward(model, batch)
    b = out.batch_size
    weights = torch.linspace(0.5, 1.5, 2 * b)
    loss = (out.sums * weights).sum() + out.token_logps[:b].sum() / out.response_mask[:b].sum()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _assert_same_grads(model, batch, min_tensors: int):
    shared = _objective_grads(model, batch, shared_pair_logps)
    unshared = _objective_grads(model, batch, pair_logps)
    assert shared.keys() == unshared.keys() and len(shared) >= min_tensors
    for name, want in unshared.items():
        got, scale = shared[name], want.abs().max()
        assert scale > 0, name
        assert (got - want).norm() <= 1e-5 * want.norm(), name
        torch.testing.assert_close(got, want, rtol=1e-5, atol=float(1e-5 * scale), msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_every_gradient_equals_unshared(model, batches, kind):
    model.eval()  # the tiny model has no dropout; eval only keeps the comparison deterministic
    trainable = sum(1 for p in model.parameters() if p.requires_grad)
    # text-only batches leave the vision tower without gradients, in both paths alike
    _assert_same_grads(model, batches[kind], trainable if kind != "text_only" else 20)


def test_lora_gradients_equal_unshared(tiny_policy_dir, batches):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    lora = get_peft_model(_model(tiny_policy_dir), config)
    assert shared_prefix_support(lora) is None
    adapters = sum(1 for n, p in lora.named_parameters() if p.requires_grad)
    _assert_same_grads(lora, batches["mixed"], adapters)


def test_gradient_checkpointing_gradients_equal_unshared(tiny_policy_dir, batches):
    checkpointed = _model(tiny_policy_dir)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed.train()
    assert checkpointed.is_gradient_checkpointing
    _assert_same_grads(checkpointed, batches["mixed"], sum(1 for _ in checkpointed.parameters()))


def test_prompt_runs_once_in_one_row_per_pair(model, batches):
    """The vision tower sees each pair's pixels once and the language model one row per pair, no
    wider than its longest prompt + chosen + rejected."""
    batch = batches["mixed"]
    seen = {"vision": [], "language": []}
    hooks = [
        model.model.visual.register_forward_hook(lambda m, a, o: seen["vision"].append(a[0].shape[0])),
        model.model.language_model.register_forward_pre_hook(
            lambda m, a, kw: seen["language"].append(tuple(kw["inputs_embeds"].shape[:2])), with_kwargs=True
        ),
    ]
    try:
        with torch.no_grad():
            shared_pair_logps(model, batch)
    finally:
        for hook in hooks:
            hook.remove()
    rows = batch["input_ids"].shape[0] // 2
    lengths = batch["attention_mask"][:rows].sum(dim=1) + batch["response_mask"][rows:].sum(dim=1)
    assert seen["vision"] == [batch["pixel_values"].shape[0]]
    assert seen["language"] == [(rows, int(lengths.max()))]


def test_packing_and_mask_by_hand():
    """Two pairs: (prompt 2, chosen 2, rejected 1) and (prompt 1, chosen 1, rejected 3)."""
    ids = torch.tensor([[1, 2, 3, 4, 0], [5, 6, 0, 0, 0], [1, 2, 7, 0, 0], [5, 8, 9, 10, 0]])
    attention = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    response = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 1, 1, 1, 0]]).bool()
    packed = pack_pairs({"input_ids": ids, "attention_mask": attention, "response_mask": response}, pad_id=99)
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 7], [5, 6, 8, 9, 10]]
    mask = pair_attention_mask(packed, "sdpa", torch.float32)[0, 0].int().tolist()
    assert mask == [  # row 0: prompt 1 2 | chosen 3 4 | rejected 7 (sees the prompt and itself only)
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 0, 0, 1],
    ]
    additive = pair_attention_mask(packed, "eager", torch.float32)[1, 0]
    assert (additive[4] == 0).tolist() == [True, False, True, True, True]  # rejected 10 skips chosen 6
    assert additive[4, 1] == torch.finfo(torch.float32).min


def test_bad_pair_batches_are_refused():
    ids = torch.tensor([[1, 2, 3], [1, 9, 4]])
    attention = torch.ones_like(ids)
    response = torch.tensor([[0, 0, 1], [0, 0, 1]]).bool()
    with pytest.raises(ValueError, match="different prompts"):
        pack_pairs({"input_ids": ids, "attention_mask": attention, "response_mask": response}, 0)
    response = torch.tensor([[0, 1, 1], [0, 0, 1]]).bool()
    with pytest.raises(ValueError, match="different lengths"):
        pack_pairs({"input_ids": ids, "attention_mask": attention, "response_mask": response}, 0)


def test_unsupported_models_fall_back_with_a_reason(tiny_policy_dir, model):
    assert choose_pair_forward(model, True).shared
    off = choose_pair_forward(model, False)
    assert not off.shared and off.reason == "train.share_prompt is false"
    from transformers import Qwen2_5_VLConfig

    sliding = Qwen2_5_VLConfig.from_pretrained(tiny_policy_dir)
    sliding.text_config.layer_types = ["sliding_attention"] * sliding.text_config.num_hidden_layers
    from transformers import Qwen2_5_VLForConditionalGeneration

    windowed = Qwen2_5_VLForConditionalGeneration(sliding)
    forward = choose_pair_forward(windowed, True)
    assert not forward.shared and "sliding-window" in forward.reason, forward
    from transformers import Qwen2Config, Qwen2ForCausalLM

    text_only = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    forward = choose_pair_forward(text_only, True)
    assert not forward.shared and "no get_rope_index" in forward.reason, forward
    assert forward.describe().startswith("unshared (shared prompt not supported: ")


# ---------------------------------------------------------------------------------------------
# The switch through `mpo train`.


def _train(policy_dir, out, *overrides):
    from mpo.config import load_recipe
    from mpo.train.run import run_training

    pairs = REPO / "tests" / "fixtures" / "pairs" / "colour_pairs.jsonl"
    recipe = load_recipe(
        REPO / "recipes" / "tiny" / "mpo_offline.yaml",
        [f"model.policy={policy_dir}", f"data.preferences={pairs}", f"run.output_dir={out}",
         "train.max_steps=2", "train.save_steps=100", *overrides],
    )
    run_training(recipe)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss/preference" in r], json.loads((out / "data_report.json").read_text())


def test_share_prompt_switch_trains_the_same_and_reports_padding(tiny_policy_dir, tmp_path):
    shared, shared_report = _train(tiny_policy_dir, tmp_path / "shared")
    unshared, unshared_report = _train(tiny_policy_dir, tmp_path / "unshared", "train.share_prompt=false")
    for key in ("loss", "loss/generation", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm"):
        assert [r[key] for r in shared] == pytest.approx([r[key] for r in unshared], rel=1e-5, abs=1e-6), key
    assert shared[1]["rewards/margins"] != 0.0
    a, b = shared_report["padding"], unshared_report["padding"]
    assert (a["layout"], b["layout"]) == ("shared", "unshared")
    assert a["group_by_length"] and a["micro_batches"] == b["micro_batches"] == 4  # 2 steps x 2 micro-batches
    assert a["tokens"] < b["tokens"]  # the prompt once, not twice
    assert 0.0 <= a["padding_fraction"] < 0.5 and a["from_step"] == 0
    assert b["pair_forward"] == "unshared (train.share_prompt is false)"
