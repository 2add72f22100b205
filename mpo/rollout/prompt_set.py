"""A prompt set a policy can answer: the recipe's ``data.prompts`` loaded and checked before any model
loads (ids, images, control-token text, token lengths against the policy's limit), for the rounds'
rollouts (``rollout.on_too_long``) and for GRPO (``grpo.on_too_long``).
"""

from __future__ import annotations

from pathlib import Path

from mpo.errors import MpoError
from mpo.records import Prompt


def load_prompt_set(recipe, *, on_too_long: str, setting: str, room: int = 1, room_setting: str = "",
                    image_cache: Path | None = None, quiet: bool = False) -> list[Prompt]:
    """``data.prompts`` with bad images skipped or refused (``data.on_bad_image``) and prompts too long
    for the policy refused or skipped (:func:`drop_too_long`); an empty set is an error."""
    from mpo.data import load_prompts

    d = recipe.data
    if not d.prompts:
        raise MpoError("data.prompts: a prompt set (jsonl, parquet or dataset folder) is required")
    cache = image_cache if image_cache is not None else Path(recipe.run.output_dir) / "image_cache"
    loaded = load_prompts(d.prompts, image_root=d.image_root, on_bad_image=d.on_bad_image, image_cache=cache,
                          split=d.split)
    if loaded.skipped and not quiet:
        for message in loaded.skipped:
            print(f"skipped (bad image): {message}")
        print(f"{len(loaded.skipped)} prompt(s) skipped for bad images, {len(loaded.records)} kept")
    prompts = loaded.records
    if prompts:
        prompts = drop_too_long(recipe, prompts, loaded.sources, on_too_long=on_too_long, setting=setting,
                                room=room, room_setting=room_setting, quiet=quiet)
    if not prompts:
        raise MpoError(f"{d.prompts}: no usable prompts")
    return prompts


def drop_too_long(recipe, prompts: list[Prompt], sources: list[str], *, on_too_long: str, setting: str,
                  room: int = 1, room_setting: str = "", quiet: bool = False) -> list[Prompt]:
    """Prompts whose tokens (image tokens included) leave fewer than ``room`` tokens to generate under the
    policy's limit: an error naming the first, or with ``on_too_long: skip`` (the setting ``setting``)
    left out and counted. With ``data.special_tokens=error`` a prompt holding a control token's text is
    refused here too."""
    from mpo import control_tokens as control
    from mpo.chat import ChatEncoder
    from mpo.data.images import ImageError
    from mpo.models import max_positions, model_folder, recipe_processor, stop_ids

    folder = model_folder(recipe.model.policy or "", "model.policy")
    limit = recipe.rollout.max_model_len or max_positions(folder)
    encoder = ChatEncoder(recipe_processor(folder, recipe.model), stop_ids(folder))
    kept, skipped = [], []
    escape = recipe.data.special_tokens == "escape"
    for prompt, where in zip(prompts, sources):
        if not escape:  # data.special_tokens=error: a prompt holding a control token's text is refused
            control.check_rows(encoder.literals, [(where, prompt.messages, {})])
        try:
            length = encoder.prompt_length(prompt.messages, prompt.images)
        except ImageError as err:  # an image the resize refuses (aspect ratio)
            raise MpoError(f"{where}: field 'images': {err}") from None
        if length + room <= limit:
            kept.append(prompt)
            continue
        generated = f" + {room} to generate ({room_setting})" if room > 1 else ""
        message = (f"{where}: the prompt is {length} tokens (image tokens included){generated}; the policy takes "
                   f"at most {limit} (rollout.max_model_len, else the model's max_position_embeddings)")
        if on_too_long == "error":
            raise MpoError(f"{message}: shorten it, lower model.max_pixels, or skip such prompts ({setting}=skip)")
        skipped.append(message)
    if skipped and not quiet:
        for message in skipped[:10]:
            print(f"skipped (too long): {message}")
        print(f"{len(skipped)} prompt(s) skipped as too long for the policy, {len(kept)} kept")
    return kept
