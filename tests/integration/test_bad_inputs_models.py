"""Damaged or mismatched model folders and output paths, as a user meets them: the `mpo` console
script from a working folder with relative paths. Each ends before any work with exit 2 and one
``error:`` line naming the recipe key (or option) and the file; a result that cannot be written
where asked is written beside it, and one line says where."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_bad_inputs import assert_one_line, mpo, workdir  # noqa: F401  (workdir: the shared user folder)

pytestmark = pytest.mark.slow


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.fixture(scope="module")
def user(workdir) -> Path:  # noqa: F811
    """The shared user folder plus one spoiled model folder per case (made once, read by each)."""
    root = workdir.parent / "models_user"
    shutil.copytree(workdir, root, ignore=shutil.ignore_patterns("runs"))
    head = shutil.copytree(root / "reward", root / "reward_head32")  # hidden size 64, a head made for 32
    save_file({"v_head.summary.weight": torch.zeros(1, 32), "v_head.summary.bias": torch.zeros(1)},
              str(head / "value_head.safetensors"), metadata={"format": "pt"})
    text_only = shutil.copytree(root / "reward", root / "text_only")  # a reward folder edited to text-only
    _edit_config(text_only, model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    bert = shutil.copytree(root / "policy", root / "bert")  # a BERT-like config over the same files
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"],
                                                  "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 1024}))
    other_size = shutil.copytree(root / "policy", root / "other_size")  # config.json of a wider model
    config = json.loads((other_size / "config.json").read_text())
    _edit_config(other_size, text_config={**config["text_config"], "hidden_size": 128})
    cut = shutil.copytree(root / "policy", root / "cut_tokenizer")  # a tokenizer.json cut short
    (cut / "tokenizer.json").write_bytes((cut / "tokenizer.json").read_bytes()[:1000])
    no_tokenizer = shutil.copytree(root / "policy", root / "no_tokenizer")
    (no_tokenizer / "tokenizer.json").unlink()
    no_processor = shutil.copytree(root / "reward", root / "no_processor")
    (no_processor / "processor_config.json").unlink()
    (root / "a_folder").mkdir()
    (root / "a_file").write_text("not a folder\n")
    return root


def test_a_value_head_of_the_wrong_shape_stops_iterate_before_the_rollout(user):
    result = mpo(user, "iterate", "iterate.yaml", "model.reward_model=reward_head32", "run.output_dir=runs/head")
    assert_one_line(result, r"^error: model\.reward_model: .*/reward_head32/value_head\.safetensors: "
                            r"v_head\.summary\.weight is \[1, 32\] but the model's hidden size is 64")
    assert not (user / "runs" / "head").exists(), "the run folder was touched before the reward model was checked"
    assert "rollout" not in result.stdout


def test_a_separate_reference_of_another_architecture_stops_iterate_before_the_rollout(user):
    result = mpo(user, "iterate", "iterate.yaml", "train.reference_model=text_only", "run.output_dir=runs/ref")
    assert_one_line(result, r"^error: train\.reference_model: .*/text_only/config\.json: model_type 'qwen2' "
                            r"\(Qwen2ForCausalLM\) is not an image-text-to-text model that transformers .* loads")
    assert not (user / "runs" / "ref").exists()


@pytest.mark.parametrize("folder, pattern", [
    ("text_only", r"model\.policy: .*/text_only/config\.json: model_type 'qwen2' \(Qwen2ForCausalLM\) is not an "
                  r"image-text-to-text model .*AutoModelForImageTextToText.*a policy is a vision-language model"),
    ("bert", r"model\.policy: .*/bert/config\.json: model_type 'bert' \(BertModel\) is not an image-text-to-text"),
    ("no_tokenizer", r"model\.policy: .*/no_tokenizer: no tokenizer files \(one of tokenizer\.json, "),
    ("cut_tokenizer", r"model\.policy: .*/cut_tokenizer/tokenizer\.json: not valid JSON \(Expecting "),
    ("other_size", r"model\.policy: .*/other_size/model\.safetensors: (lm_head|model\.embed_tokens)\.weight is "
                   r"\[1024, 64\] but config\.json says vocab_size 1024, hidden_size 128: the weights and "
                   r"config\.json are of different models"),
])
def test_a_policy_folder_that_cannot_be_a_policy(user, folder, pattern):
    result = mpo(user, "train", "train.yaml", f"model.policy={folder}", f"run.output_dir=runs/{folder}")
    assert_one_line(result, pattern)
    assert not (user / "runs" / folder).exists(), "the run folder was touched before the policy was checked"


def test_an_empty_policy_is_not_the_working_folder(user):
    """``model.policy=`` (empty) is "not set", not the folder the command runs in."""
    result = mpo(user, "iterate", "iterate.yaml", "model.policy=", "run.output_dir=runs/empty")
    assert_one_line(result, r"^error: model\.policy: not set; give a model folder or a Hugging Face Hub id")
    assert not (user / "runs" / "empty").exists()


def test_a_reward_model_without_its_processor_and_one_of_another_family(user):
    assert_one_line(mpo(user, "reward", "score", "--model", "no_processor", "--input", "items.jsonl",
                        "--output", "out.jsonl"),
                    r"^error: --model: no_processor: no image processor settings \(processor_config\.json or "
                    r"preprocessor_config\.json\)")
    assert_one_line(mpo(user, "reward", "train", "reward_train.yaml", "reward_train.init_from=text_only",
                        "run.output_dir=runs/rm_text"),
                    r"^error: reward_train\.init_from: .*/text_only/config\.json: model_type 'qwen2' "
                    r"\(Qwen2ForCausalLM\): a reward model here is Qwen2\.5-VL")
    assert not (user / "runs" / "rm_text").exists()


@pytest.mark.parametrize("command", [
    ["reward", "score", "--model", "reward", "--input", "items.jsonl", "--output", "a_folder"],
    ["reward", "eval", "--model", "reward", "--benchmark", "pairs", "--data", "pairs.jsonl", "--output", "a_folder"],
])
def test_output_naming_an_existing_folder_stops_before_scoring(user, command):
    result = mpo(user, *command)
    assert_one_line(result, r"^error: --output a_folder: is a folder; name the file to write \(e\.g\. a_folder/")
    assert "scoring" not in result.stderr and "scored" not in result.stdout
    assert list((user / "a_folder").iterdir()) == []


@pytest.mark.parametrize("command, output_dir, pattern", [
    (["train", "train.yaml"], "a_file",
     r"run\.output_dir: .*/a_file: is a file, not a folder \(name another path, or move the file\)"),
    (["iterate", "iterate.yaml"], "a_file/run", r"run\.output_dir: .*/a_file/run: .*/a_file is a file, not a folder"),
    (["reward", "train", "reward_train.yaml"], "a_file", r"run\.output_dir: .*/a_file: is a file"),
])
def test_run_folder_where_a_file_is(user, command, output_dir, pattern):
    assert_one_line(mpo(user, *command, f"run.output_dir={output_dir}"), pattern)
    assert (user / "a_file").read_text() == "not a folder\n"


def test_scores_that_cannot_be_written_are_kept_beside(user, tmp_path):
    """A disk that fills up while the scores are written (a real 8 KB tmpfs): the scores are written
    to scores.recovered.jsonl in the working folder, and the one line says so."""
    full = user / "full"
    full.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(full)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); needs root in a container that allows it")
    try:
        row = json.loads((user / "items.jsonl").read_text().splitlines()[0])
        (user / "big.jsonl").write_text(json.dumps({**row, "note": "x" * 20000}) + "\n")  # one row > 8 KB
        result = mpo(user, "reward", "score", "--model", "reward", "--input", "big.jsonl",
                     "--output", "full/scores.jsonl")
        recovered = user / "scores.recovered.jsonl"
        assert_one_line(result, rf"^error: full/scores\.jsonl: could not write \(.*no space left on the device.*\); "
                                rf"1 scored row\(s\) written to {recovered} instead$")
        kept = [json.loads(line) for line in recovered.read_text().splitlines()]
        assert len(kept) == 1 and kept[0]["note"] == "x" * 20000 and isinstance(kept[0]["reward"], float)
        assert not (full / "scores.jsonl").exists()
    finally:
        subprocess.run(["umount", "-l", str(full)], capture_output=True)
