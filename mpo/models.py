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
write), the architecture (a policy: a ``model_type`` transformers loads as image-text-to-text; a
reward model: Qwen2.5-VL with a ``value_head.safetensors`` holding the Skywork keys in shapes that
fit its hidden size, read from the safetensors header alone), and the tokenizer and processor
files. It is the one check of a model folder: every command calls it (through
:func:`model_folder`) before its first model loads; a folder that passed is not read again.
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
VALUE_HEAD_FILE = "value_head.safetensors"  # a reward model's head, beside its backbone
VALUE_HEAD_KEYS = {"v_head.summary.weight", "v_head.summary.bias"}
REWARD_MODEL_TYPE = "qwen2_5_vl"  # reward.model.RewardModel's backbone
# What AutoProcessor needs: a tokenizer's vocabulary (any of these) and the image processor's settings.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
_CHECKED: dict[tuple, tuple] = {}  # folders that passed check_model_folder -> their files then


class ModelFolderError(MpoError):
    """A model reference that names no usable model; the message names the recipe key or file."""


def absolute(value: str, cwd: str | os.PathLike | None = None) -> str:
    """``value`` as an absolute path (``~`` expanded), relative to ``cwd`` (default: the working directory)."""
    path = Path(os.path.expanduser(value))
    return os.path.normpath(path if path.is_absolute() else Path(cwd or os.getcwd()) / path)


def classify(value: str, cwd: str | os.PathLike | None = None) -> str:
    """A recipe's model reference as it is stored: an absolute path, or a Hub id unchanged (an empty one
    stays empty: not set, not the working directory)."""
    if not value.strip():
        return ""
    local = absolute(value, cwd)
    if Path(local).is_dir() or value.startswith(LOCAL_PREFIXES) or os.path.isabs(value):
        return local
    if HUB_ID.fullmatch(value) and not Path(local).parent.is_dir():
        return value
    return local


def is_hub_id(value: str) -> bool:
    return not os.path.isabs(value) and HUB_ID.fullmatch(value) is not None


def model_folder(value: str | os.PathLike, key: str, reward: bool = False, **check) -> Path:
    """The checked folder a model reference names (a Hub id is fetched, or found in the cache);
    ``check``: more of :func:`check_model_folder`'s options."""
    value = str(value)
    if not value.strip():
        raise ModelFolderError(f"{key}: not set; give a model folder or a Hugging Face Hub id (in the recipe, or "
                               f"as the override {key}=...)")
    if is_hub_id(value):
        folder = _fetch(value, key)
    else:
        folder = Path(value)
        if not folder.exists():
            raise ModelFolderError(f"{key}: {folder}: no such folder")
    check_model_folder(folder, key, reward=reward, **check)
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


def check_model_folder(folder: str | os.PathLike, key: str = "model", reward: bool = False,
                       reward_backbone: bool = False, processor: bool = True) -> None:
    """Refuse, with one line naming the recipe key and the file, a folder that would fail (or be
    unsafe) to load: see the module docstring. ``reward``: a reward model (Qwen2.5-VL with its value
    head); ``reward_backbone``: a Qwen2.5-VL to start reward training from (a value head optional);
    else a policy (an image-text-to-text model). ``processor``: its tokenizer and processor files too.
    A folder that passed is not read again in this process while its files stay as they were (a pass
    with its processor files also answers a check of the weights alone), so each command checks each
    folder once however many of its parts ask."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"{key}: {folder}: not a folder")
    memo = (str(folder.resolve()), reward, reward_backbone, processor)
    signature = _signature(folder)
    if signature in (_CHECKED.get(memo), _CHECKED.get((*memo[:3], True))):
        return
    config = _read_json(folder / "config.json", key, "not a model folder (no config.json)")
    weights = sorted(folder.glob("*.safetensors"))
    pickles = sorted(p for pattern in PICKLE_WEIGHTS for p in folder.glob(pattern) if p.name != "training_args.bin")
    model_weights = [w for w in weights if w.name != VALUE_HEAD_FILE]
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
        shapes = safetensors_shapes(file, key)
        if file.name == VALUE_HEAD_FILE:
            _check_value_head(file, shapes, config, key)
        else:
            _check_embedding_shapes(file, shapes, config, key)
    _check_architecture(folder, config, key, reward or reward_backbone)
    if reward and not (folder / VALUE_HEAD_FILE).is_file():
        raise ModelFolderError(f"{key}: {folder}: no {VALUE_HEAD_FILE} (not a reward model, Skywork layout)")
    if processor:
        _check_processor_files(folder, key)
    _CHECKED[memo] = signature


def _signature(folder: Path) -> tuple:
    """The top-level files' names, sizes and modification times: what a passed check is kept by."""
    with os.scandir(folder) as entries:
        return tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in entries if e.is_file()))


def _text_setting(config: dict, name: str) -> int | None:
    """A setting of the text model: its ``text_config``'s where there is one (a value left at its
    default is not written there: None, nothing is checked), else the top level's (older layouts)."""
    text = config["text_config"] if isinstance(config.get("text_config"), dict) else config
    value = text.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _check_value_head(file: Path, shapes: dict[str, list[int]], config: dict, key: str) -> None:
    """The Skywork value head's keys, and shapes that fit the backbone: weight [1, hidden], bias [1]."""
    if set(shapes) != VALUE_HEAD_KEYS:
        raise ModelFolderError(f"{key}: {file}: expected keys {sorted(VALUE_HEAD_KEYS)}, found {sorted(shapes)}")
    hidden = _text_setting(config, "hidden_size")
    weight, bias = shapes["v_head.summary.weight"], shapes["v_head.summary.bias"]
    if hidden is not None and weight != [1, hidden]:
        raise ModelFolderError(f"{key}: {file}: v_head.summary.weight is {weight} but the model's hidden size is "
                               f"{hidden} (expected [1, {hidden}]): the value head belongs to another model")
    if bias != [1]:
        raise ModelFolderError(f"{key}: {file}: v_head.summary.bias is {bias}, expected [1] (one score per sequence)")


def _check_embedding_shapes(file: Path, shapes: dict[str, list[int]], config: dict, key: str) -> None:
    """The token embedding and LM head hold [vocab_size, hidden_size] of config.json's text model:
    weights of another size (or vocabulary) than the config would fail to load (size mismatch)."""
    vocab, hidden = _text_setting(config, "vocab_size"), _text_setting(config, "hidden_size")
    if vocab is None or hidden is None:
        return
    for name, shape in shapes.items():
        if (name.endswith("embed_tokens.weight") or name == "lm_head.weight") and shape != [vocab, hidden]:
            raise ModelFolderError(f"{key}: {file}: {name} is {shape} but config.json says vocab_size {vocab}, "
                                   f"hidden_size {hidden}: the weights and config.json are of different models")


def _check_architecture(folder: Path, config: dict, key: str, reward: bool) -> None:
    """A reward model (or its start) is Qwen2.5-VL; a policy is a model transformers loads as
    image-text-to-text (its model_type in AutoModelForImageTextToText's mapping, or remote code that
    registers it there)."""
    model_type = config.get("model_type")
    where = f"{key}: {folder / 'config.json'}: model_type {model_type!r}"
    names = ", ".join(config.get("architectures") or []) or "no architectures"
    if reward:
        if model_type != REWARD_MODEL_TYPE:
            raise ModelFolderError(f"{where} ({names}): a reward model here is Qwen2.5-VL (model_type "
                                   f"{REWARD_MODEL_TYPE!r}, Skywork-VL Reward's backbone)")
        return
    if "AutoModelForImageTextToText" in (config.get("auto_map") or {}):
        return  # remote code that registers itself (model.trust_remote_code decides whether it runs)
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as LOADABLE

    if model_type not in LOADABLE:
        import transformers

        raise ModelFolderError(f"{where} ({names}) is not an image-text-to-text model that transformers "
                               f"{transformers.__version__} loads (AutoModelForImageTextToText); a policy is a "
                               "vision-language model (e.g. qwen2_5_vl, qwen2_vl, qwen3_vl, internvl, llava, gemma3, glm4v)")


def _check_processor_files(folder: Path, key: str) -> None:
    """What ``AutoProcessor`` reads: a tokenizer's vocabulary and the image processor's settings,
    and every JSON file beside them whole."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES) and not any(folder.glob("*.tiktoken")):
        raise ModelFolderError(f"{key}: {folder}: no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); "
                               "save the processor with the model (processor.save_pretrained(folder))")
    if not any((folder / name).is_file() for name in PROCESSOR_FILES):
        raise ModelFolderError(f"{key}: {folder}: no image processor settings ({' or '.join(PROCESSOR_FILES)}); "
                               "save the processor with the model (processor.save_pretrained(folder))")
    for path in sorted(folder.glob("*.json")):  # a truncated tokenizer.json or processor_config.json
        if path.name in ("config.json", "model.safetensors.index.json"):  # read above
            continue
        try:
            json.loads(path.read_bytes())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ModelFolderError(f"{key}: {path}: not valid JSON ({err})") from None


def safetensors_shapes(file: Path, key: str) -> dict[str, list[int]]:
    """The tensor names and shapes of a safetensors file, from its header alone, after safetensors
    checked the header against the file's size."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="np") as handle:
            return {name: list(handle.get_slice(name).get_shape()) for name in handle.keys()}
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
    of its top-level files (:func:`mpo.keys.file_digest`), never its path or file times, so a
    copied or moved model keeps its identity. A Hub id: ``{"hub": id}``, with its cached snapshot's
    files where there is one. A missing folder: ``{"missing": value}``. The one answer to "which
    files make up this model" (stage keys, training keys, the reference log-probs' fingerprint)."""
    from mpo.keys import file_digest

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
    """:func:`folder_identity` as keys of the earlier format held it (see :mod:`mpo.keys`): the
    path and each top-level file's name, size and modification time (a Hub id: the id alone)."""
    from mpo.keys import legacy_file_stat

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

    The budget is the Qwen family's (a processor :mod:`mpo.data.images` has a resize rule for);
    transformers 5 takes it as ``size={shortest_edge, longest_edge}`` (in pixels; the model card's
    ``min_pixels=`` / ``max_pixels=`` keywords still load but warn on every call). Another family
    keeps its processor's own resizing and tiling, never a crop to a budget it was not made for;
    where a budget was asked for (``budget_given``), one line says it does not apply."""
    from transformers import AutoProcessor

    from mpo.data.images import resize_rule

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
