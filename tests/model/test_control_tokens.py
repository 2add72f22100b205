"""Control-token text in data (mpo.control_tokens through mpo.chat.ChatEncoder), on every family's own
processor and chat template: a literal ``<|image_pad|>``, ``<|im_end|>``, ``<|vision_start|>`` or the
family's image token inside a prompt, a chosen or a rejected response is tokenized as plain text (the
ids ``split_special_tokens=True`` gives), the real image tokens stay exactly those of the images, and
texts without a literal are encoded as the processor and tokenizer encode them directly."""

from __future__ import annotations

from collections import Counter

import pytest
from PIL import Image

from mpo import control_tokens as control
from mpo.chat import ChatEncoder

FAMILIES = ["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "glm4v", "internvl", "llava", "gemma3"]
QWEN_LITERALS = ["<|image_pad|>", "<|im_end|>", "<|vision_start|>"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """``(name, processor, encoder)``: the family's processor saved and loaded back as a user's is."""
    from transformers import AutoProcessor

    from mpo.cli.tiny_families import FAMILIES as BUILDERS
    from mpo.models import eos_list

    if request.param == "qwen2_5_vl":
        from mpo.cli.tiny import build_policy

        model, processor = build_policy(seed=0)
    else:
        model, processor = BUILDERS[request.param]()
    folder = tmp_path_factory.mktemp(request.param)
    processor.save_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    return request.param, processor, ChatEncoder(processor, eos_list(model.generation_config.eos_token_id))


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("pictures") / "odd.png"
    Image.new("RGB", (90, 60), "red").save(path)
    return path


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def _specials(processor, ids) -> Counter:
    """How often each special (control) id occurs in ``ids``."""
    tokenizer = processor.tokenizer
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return Counter(i for i in ids if i in special)


def _plain(processor, text: str) -> list[int]:
    return processor.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def _contains(ids: list[int], piece: list[int]) -> bool:
    return any(ids[i : i + len(piece)] == piece for i in range(len(ids) - len(piece) + 1))


def test_a_literal_is_plain_text_in_prompt_chosen_and_rejected(family, picture):
    name, processor, encoder = family
    tokenizer = processor.tokenizer
    plain_pair = encoder.encode_pair(_user("Is it here?"), [picture], "Yes.", "No.")
    for literal in dict.fromkeys([*QWEN_LITERALS, processor.image_token]):
        question, chosen, rejected = f"Is {literal} here?", f"Yes {literal}.", f"No{literal}"
        pair = encoder.encode_pair(_user(question), [picture], chosen, rejected)
        # exactly the control tokens of the same prompt without the literal: the image's, the template's
        assert _specials(processor, pair.prompt_ids) == _specials(processor, plain_pair.prompt_ids), (name, literal)
        assert _contains(pair.prompt_ids, _plain(processor, question)), (name, literal)
        assert _contains(pair.prompt_ids, _plain(processor, literal))
        for response, ids, plain_ids in ((chosen, pair.chosen_ids, plain_pair.chosen_ids),
                                         (rejected, pair.rejected_ids, plain_pair.rejected_ids)):
            lead, suffix = (tokenizer(t, add_special_tokens=False)["input_ids"] if t else []
                            for t in (encoder.lead, encoder.suffix))
            assert ids == lead + _plain(processor, response) + suffix, (name, literal)
            assert _specials(processor, ids) == _specials(processor, plain_ids)
        for key, types in pair.token_types.items():  # per-token arrays stay aligned, the text's are 0
            assert len(types) == len(pair.prompt_ids) and sum(map(bool, types)) == sum(
                map(bool, plain_pair.token_types[key]))
        # the lengths counted from headers and the unexpanded ids agree with the encoding
        grown = len(pair.prompt_ids) - len(plain_pair.prompt_ids)
        assert encoder.prompt_length(_user(question), [picture]) - encoder.prompt_length(
            _user("Is it here?"), [picture]) == grown
        assert len(encoder.unexpanded_ids(_user(question))) - len(encoder.unexpanded_ids(_user("Is it here?"))) == grown


def test_texts_without_a_literal_are_encoded_as_before(family, picture):
    """The encoder's ids for literal-free text are the processor's and tokenizer's own, unchanged."""
    _, processor, shared = family
    encoder = ChatEncoder(processor, shared.stop_ids)
    messages = _user("What colour is it?")
    text = encoder.render_prompt(messages)
    direct = processor(text=[text], images=encoder.images([picture]), return_tensors="pt",
                       add_special_tokens=encoder._special_tokens(text))
    pair = encoder.encode_pair(messages, [picture], "Red.", "Blue.")
    assert pair.prompt_ids == direct["input_ids"][0].tolist()
    assert pair.chosen_ids == processor.tokenizer(encoder.lead + "Red." + encoder.suffix,
                                                  add_special_tokens=False)["input_ids"]
    assert encoder._marker is None  # no marker was ever needed


def test_string_contents_several_texts_and_batches(family, picture):
    """A string content and several marked texts splice back in order; a batch encodes each prompt as
    it is encoded alone."""
    name, processor, encoder = family
    literal = processor.image_token
    first, second = f"Look {literal} at", f"and tell <|im_end|> me {literal}"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": first},
                                             {"type": "text", "text": second}]}]
    prompt = encoder.encode_prompt(messages, [picture])
    at_first = next(i for i in range(len(prompt.input_ids)) if _contains(prompt.input_ids[: i + 1],
                                                                         _plain(processor, first)))
    assert _contains(prompt.input_ids[at_first:], _plain(processor, second)), name
    said = f"Say {literal} twice <|vision_start|>"
    # a string content (LLaVA-1.5's template renders list contents only: there the text part)
    text_only = [{"role": "user", "content": [{"type": "text", "text": said}] if name == "llava" else said}]
    alone = encoder.encode_prompt(text_only)
    assert _contains(alone.input_ids, _plain(processor, said))
    assert _specials(processor, alone.input_ids) == _specials(processor, encoder.encode_prompt(
        [{**text_only[0], "content": "Say it twice"}]).input_ids)
    batch = encoder.encode_prompts([messages, _user("plain")], [[picture], [picture]])
    assert [b.input_ids for b in batch] == [prompt.input_ids, encoder.encode_prompt(_user("plain"), [picture]).input_ids]


def _grpo_view(processor):
    """What MpoGRPOTrainer._tokenize_prompts and TRL's own read off a trainer (no model needed)."""
    from types import SimpleNamespace

    return SimpleNamespace(tools=None, environment_factories=None, chat_template=None, chat_template_kwargs={},
                           _is_vlm=True, processing_class=processor, encoder=ChatEncoder(processor), _encoded=None)


def _same_fields(ours: dict, theirs: dict) -> bool:
    """Equal multimodal fields; TRL keeps some families' pixel_values as a list of per-image tensors."""
    import torch

    def tensor(value):
        return torch.stack(value) if isinstance(value, list) and torch.is_tensor(value[0]) else value

    return ours.keys() == theirs.keys() and all(
        torch.equal(tensor(ours[k]), tensor(theirs[k])) if torch.is_tensor(ours[k]) else ours[k] == theirs[k]
        for k in ours)


def test_grpo_prompts_are_trls_until_a_literal_then_plain_text(family, picture):
    """mpo grpo's prompt ids (mpo.grpo.trainer.MpoGRPOTrainer._tokenize_prompts, through the encoder): for
    prompts without a literal exactly TRL's GRPOTrainer._tokenize_prompts' ids, images and multimodal
    fields (a batch mixing images, two images, a system turn and text only; a text-only batch); a literal
    in a GRPO prompt is plain text, where TRL's own makes it the control token."""
    import copy

    from trl import GRPOTrainer

    from mpo.data.images import fit_image
    from mpo.grpo.trainer import MpoGRPOTrainer

    name, processor, _ = family
    view = _grpo_view(processor)
    image = fit_image(picture, processor.image_processor)
    square = fit_image(Image.new("RGB", (64, 64), "blue"), processor.image_processor)

    def user(text, *images):
        return {"role": "user", "content": [*({"type": "image", "image": i} for i in images),
                                            {"type": "text", "text": text}]}

    batch = [[user("What colour is it?", image)],
             [{"role": "system", "content": "Be brief."}, user("Same colour? Say it in a sentence.", square, image)],
             [{"role": "user", "content": "Say a colour."}]]
    for prompts in (batch, batch[2:]):
        ours = MpoGRPOTrainer._tokenize_prompts(view, copy.deepcopy(prompts))
        theirs = GRPOTrainer._tokenize_prompts(view, copy.deepcopy(prompts))
        assert ours[:2] == theirs[:2] and _same_fields(ours[2], theirs[2]), name
    question = f"Is {processor.image_token} here <|im_end|> or <|vision_start|>?"
    ids = MpoGRPOTrainer._tokenize_prompts(view, [[user(question, image)]])[0][0]
    plain = MpoGRPOTrainer._tokenize_prompts(view, [[user("Is it here?", image)]])[0][0]
    assert _contains(ids, _plain(processor, question)) and _specials(processor, ids) == _specials(processor, plain)
    if name.startswith("qwen"):  # TRL's own: the literal ends the turn (and an image pad has no image)
        leaked = GRPOTrainer._tokenize_prompts(view, [[user("Is it here <|im_end|>?", image)]])[0][0]
        assert _specials(processor, leaked) != _specials(processor, plain)


def test_the_rule_finds_the_literal_and_refuses_naming_the_field(tiny_processor):
    protected = control.literals(tiny_processor)
    assert "<|im_end|>" in protected and "<|image_pad|>" in protected and "<|vision_start|>" in protected
    messages = [{"role": "system", "content": "fine"}, {"role": "user", "content": [{"type": "text", "text": "a <|im_end|>"}]}]
    assert control.find(protected, messages, chosen="x") == ("messages", "<|im_end|>")
    assert control.find(protected, [], chosen="ok", rejected="b <|vision_start|><|image_pad|>") == (
        "rejected", "<|vision_start|>")
    assert control.find(protected, messages[:1], chosen="<im_end>") is None
    with pytest.raises(control.ControlTokenError) as err:
        control.check_rows(protected, [("p.jsonl:2", messages[:1], {}), ("p.jsonl:3", messages, {})])
    assert str(err.value) == ("p.jsonl:3: field 'messages': the text contains the control token '<|im_end|>' "
                              "(data.special_tokens=error; 'escape' tokenizes it as plain text)")


def test_added_tokens_that_are_not_special_stay_vocabulary(tiny_policy_dir):
    """Qwen3-style ``<think>`` (an added token not flagged special) is not escaped: R1-style data relies on it."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_policy_dir)
    processor.tokenizer.add_tokens(["<think>"])
    think = processor.tokenizer.convert_tokens_to_ids("<think>")
    encoder = ChatEncoder(processor)
    assert "<think>" not in encoder.literals
    assert think in encoder.response_ids("<think>hm</think> 4")
    escaped = encoder.response_ids("<think>hm <|im_end|>")  # escaped text keeps <think>, not <|im_end|>
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert think in escaped and escaped.count(end) == encoder.response_ids("<think>hm").count(end) == 1
