"""Model references and model folders: what a recipe's model keys point at, checked before loading.

A model reference (``model.policy``, ``model.reward_model``, ``train.reference_model``,
``reward_train.init_from``) is either a local folder or a Hugging Face Hub id, decided once, when
the recipe loads, by :func:`classify` (against the working directory):

- an existing folder is local;
- ``./x``, ``../x``, ``/x``, ``~/x``, or a path whose parent folder exists (``runs/nope`` when
  ``runs/`` exists) is local only: a missing one is an error naming the recipe key;
- a bare ``org/name`` that is no local folder is a Hub id, fetched as transformers does where a
  hub is reachable (or found in the local Hugging Face cache); where none is, one line says that it
  is neither a local folder nor reachable.

Local references are stored as absolute paths, Hub ids as given. :func:`model_folder` turns one
into a folder on disk and :func:`check_model_folder` checks it before anything loads: a
``config.json`` that parses, safetensors weights whose headers and sizes are whole (a truncated
file names itself), no pickle-only weights (this toolkit never unpickles a checkpoint it did not
write), and for reward models a ``value_head.safetensors`` with the Skywork keys.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from mpo.errors import MpoError

LOCAL_PREFIXES = ("./", "../", "/", "~", ".\\", "..\\")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
# What a model fetched from the Hub needs here (the pickle copies many repositories carry are not).
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]
VALUE_HEAD_KEYS = {"v_head.summary.weight", "v_head.summary.bias"}


class ModelFolderError(MpoError):
    """A model reference that names no usable model; the message names the recipe key or file."""


def absolute(value: str, cwd: str | os.PathLike | None = None) -> str:
    """``value`` as an absolute path (``~`` expanded), relative to ``cwd`` (default: the working directory)."""
    path = Path(os.path.expanduser(value))
    return os.path.normpath(path if path.is_absolute() else Path(cwd or os.getcwd()) / path)


def classify(value: str, cwd: str | os.PathLike | None = None) -> str:
    """A recipe's model reference as it is stored: an absolute path, or a Hub id unchanged."""
    local = absolute(value, cwd)
    if Path(local).is_dir() or value.startswith(LOCAL_PREFIXES) or os.path.isabs(value):
        return local
    if HUB_ID.fullmatch(value) and not Path(local).parent.is_dir():
        return value
    return local


def is_hub_id(value: str) -> bool:
    return not os.path.isabs(value) and HUB_ID.fullmatch(value) is not None


def model_folder(value: str | os.PathLike, key: str, reward: bool = False) -> Path:
    """The checked folder a model reference names (a Hub id is fetched, or found in the cache)."""
    value = str(value)
    if is_hub_id(value):
        folder = _fetch(value, key)
    else:
        folder = Path(value)
        if not folder.exists():
            raise ModelFolderError(f"{key}: {folder}: no such folder")
    check_model_folder(folder, key, reward=reward)
    return folder


def _fetch(repo_id: str, key: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as err:  # offline, unknown repository, no access, network errors
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise ModelFolderError(
            f"{key}: {repo_id!r} is neither a local folder nor reachable on the Hugging Face Hub ({reason}); "
            f"write ./{repo_id} for a local folder"
        ) from None


def check_model_folder(folder: str | os.PathLike, key: str = "model", reward: bool = False) -> None:
    """Refuse, with one line naming the file, a folder that would fail (or be unsafe) to load."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"{key}: {folder}: not a folder")
    _read_json(folder / "config.json", key, "not a model folder (no config.json)")
    weights = sorted(folder.glob("*.safetensors"))
    pickles = sorted(p for pattern in PICKLE_WEIGHTS for p in folder.glob(pattern) if p.name != "training_args.bin")
    model_weights = [w for w in weights if w.name != "value_head.safetensors"]
    if not model_weights:
        if pickles:
            raise ModelFolderError(
                f"{key}: {folder}: only pickle weights ({', '.join(p.name for p in pickles)}); this toolkit "
                "loads safetensors only and never unpickles a checkpoint it did not write: convert them "
                "(save_pretrained(..., safe_serialization=True)) where you trust them"
            )
        raise ModelFolderError(f"{key}: {folder}: no model weights (*.safetensors)")
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = set(_read_json(index, key, "unreadable shard index").get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise ModelFolderError(f"{key}: {index}: shard(s) missing: {', '.join(missing)}")
    for file in weights:
        keys = safetensors_keys(file, key)
        if file.name == "value_head.safetensors" and keys != VALUE_HEAD_KEYS:
            raise ModelFolderError(f"{key}: {file}: expected keys {sorted(VALUE_HEAD_KEYS)}, found {sorted(keys)}")
    if reward and not (folder / "value_head.safetensors").is_file():
        raise ModelFolderError(f"{key}: {folder}: no value_head.safetensors (not a reward model, Skywork layout)")


def safetensors_keys(file: Path, key: str) -> set[str]:
    """The tensor names of a safetensors file, after safetensors checked its header and size."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            return set(handle.keys())
    except Exception as err:  # SafetensorError: truncated, foreign or corrupt file
        raise ModelFolderError(f"{key}: {file}: not a readable safetensors file ({err})") from None


def _read_json(path: Path, key: str, missing: str) -> dict:
    if not path.is_file():
        raise ModelFolderError(f"{key}: {path.parent}: {missing}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFolderError(f"{key}: {path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ModelFolderError(f"{key}: {path}: expected a JSON object")
    return data


def folder_identity(value: str | os.PathLike) -> dict:
    """What a model is, for the reuse of results made with it: ``{"files": {name: "<size>:<sha256>"}}``
    of its top-level files (:func:`mpo.identity.file_digest`), never its path or file times, so a
    copied or moved model keeps its identity. A Hub id: ``{"hub": id}``, with its cached snapshot's
    files where there is one. A missing folder: ``{"missing": value}``. The one answer to "which
    files make up this model" (stage keys, training keys, the reference log-probs' fingerprint)."""
    from mpo.identity import file_digest

    value = str(value)
    folder = Path(value)
    identity: dict = {}
    if is_hub_id(value):
        identity["hub"] = value
        folder = _cached_snapshot(value)
        if folder is None:
            return identity
    elif not folder.is_dir():
        return {"missing": value}
    files = sorted(f for f in folder.iterdir() if f.is_file())
    identity["files"] = {f.name: file_digest(f) for f in files}
    return identity


def _cached_snapshot(repo_id: str) -> Path | None:
    """The folder of a Hub model's snapshot in the local cache, or None (nothing is fetched)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
    except Exception:  # not cached, no huggingface_hub: the id alone
        return None


def legacy_folder_identity(value: str | os.PathLike) -> list:
    """:func:`folder_identity` as keys of the earlier format held it (see :mod:`mpo.identity`): the
    path and each top-level file's name, size and modification time (a Hub id: the id alone)."""
    from mpo.identity import legacy_file_stat

    value = str(value)
    folder = Path(value)
    if is_hub_id(value) or not folder.is_dir():
        return [value]
    return [str(folder), [[f.name, *legacy_file_stat(f)] for f in sorted(f for f in folder.iterdir() if f.is_file())]]


def eos_list(eos) -> list[int]:
    """An ``eos_token_id`` setting (an id, a list of ids, or None) as a list."""
    return [eos] if isinstance(eos, int) else [int(i) for i in eos or []]


def stop_ids(folder: str | os.PathLike) -> list[int]:
    """The model's end-of-sequence ids: its ``generation_config.json``'s (an id or a list), if any."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return []
    return eos_list(_read_json(path, "model", "").get("eos_token_id"))


def max_positions(folder: str | os.PathLike) -> int:
    """The longest sequence the model's config allows (``max_position_embeddings``)."""
    config = _read_json(Path(folder) / "config.json", "model", "not a model folder (no config.json)")
    text = config.get("text_config") or {}
    return int(text.get("max_position_embeddings") or config.get("max_position_embeddings") or 32768)


_NOTED: set[str] = set()  # folders whose "budget does not apply" line was printed


def load_processor(folder: str | os.PathLike, min_pixels: int | None = None, max_pixels: int | None = None,
                   trust_remote_code: bool = False, budget_given: bool = False):
    """The folder's processor with a per-image pixel budget (None: the processor's own bound).

    The budget is the Qwen family's (a processor :mod:`mpo.images` has a resize rule for);
    transformers 5 takes it as ``size={shortest_edge, longest_edge}`` (in pixels; the model card's
    ``min_pixels=`` / ``max_pixels=`` keywords still load but warn on every call). Another family
    keeps its processor's own resizing and tiling, never a crop to a budget it was not made for;
    where a budget was asked for (``budget_given``), one line says it does not apply."""
    from transformers import AutoProcessor

    from mpo.images import resize_rule

    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if min_pixels is None and max_pixels is None:
        return processor
    if resize_rule(processor.image_processor) is None:
        if budget_given and str(folder) not in _NOTED:
            _NOTED.add(str(folder))
            print(f"{folder}: {type(processor).__name__} sizes images its own way (a fixed size or tiles); "
                  "model.min_pixels / max_pixels do not apply to it (they do to a Qwen-family reward model)")
        return processor
    size = processor.image_processor.size
    bounds = {"shortest_edge": min_pixels or size["shortest_edge"], "longest_edge": max_pixels or size["longest_edge"]}
    if bounds["shortest_edge"] > bounds["longest_edge"]:
        raise MpoError(f"min_pixels {bounds['shortest_edge']} exceeds max_pixels {bounds['longest_edge']}")
    return AutoProcessor.from_pretrained(folder, size=bounds, trust_remote_code=trust_remote_code)


def recipe_processor(folder: str | os.PathLike, model_config):
    """:func:`load_processor` with a recipe's ``model`` section (its pixel budget, remote code)."""
    given = bool({"min_pixels", "max_pixels"} & model_config.model_fields_set)
    return load_processor(folder, model_config.min_pixels, model_config.max_pixels, model_config.trust_remote_code,
                          budget_given=given)
