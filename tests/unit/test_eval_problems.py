"""The eval stage without a model (mpo/rounds/evaluate.py, mpo/rounds/eval_problems.py): the problems each
benchmark's data gives, the prompts a backend is sent (greedy, the official MathVista query), resumable and
keyed work, the flat metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from mpo.config import ModelConfig, RolloutConfig
from mpo.errors import MpoError, RunFolderError
from mpo.records import Rollout
from mpo.rounds.evaluate import PREDICTIONS_FILE, SCORES_FILE, load_eval_problems, run_eval

EVAL = Path(__file__).resolve().parents[1] / "fixtures" / "eval"
OFFICIAL_FIELDS = ("query", "response", "error", "extraction", "prediction", "true_false")
PIDS = ("1", "2", "3", "5")


class RecordingBackend:
    """A backend that answers each prompt with ``answers[prompt_id]`` and records what it was sent."""

    def __init__(self, policy_dir: Path, answers: dict[str, str]):
        self.config = RolloutConfig(backend="hf", temperature=1.0, max_tokens=512, num_samples=4)
        self.model_config = ModelConfig(policy=str(policy_dir))
        self.policy_dir, self.answers, self.sent = policy_dir, answers, []

    def generate(self, prompts, num_samples=None, seed=None):
        self.sent.append((list(prompts), self.config.temperature, self.config.max_tokens, num_samples))
        return [Rollout(p.prompt_id, 0, self.answers.get(p.prompt_id, ""), 3, "stop", "policy") for p in prompts]


@pytest.fixture
def policy(tmp_path) -> Path:
    folder = tmp_path / "policy"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


@pytest.fixture
def testmini(tmp_path) -> Path:
    """Four rows of MathVista's output file with the official fields dropped (testmini.json's form) and
    an image of each at its ``image`` path."""
    official = json.loads((EVAL / "mathvista" / "output_chatgpt.json").read_text(encoding="utf-8"))
    rows = {pid: {k: v for k, v in official[pid].items() if k not in OFFICIAL_FIELDS} for pid in PIDS}
    (tmp_path / "images").mkdir()
    for pid, row in rows.items():
        Image.new("RGB", (28, 28), (40 * int(pid), 90, 10)).save(tmp_path / row["image"])
    (tmp_path / "testmini.json").write_text(json.dumps(rows), encoding="utf-8")
    return tmp_path / "testmini.json"


def test_mathvista_sends_the_official_query_greedily(testmini, policy, tmp_path):
    official = json.loads((EVAL / "mathvista" / "output_chatgpt.json").read_text(encoding="utf-8"))
    problems = load_eval_problems("mathvista", testmini)
    backend = RecordingBackend(policy, {"1": "so d = 1.2", "2": "The answer is 7", "3": "(C)", "5": "B"})
    metrics = run_eval(problems, backend, tmp_path / "ev", "mathvista", max_tokens=32, chunk_size=3, quiet=True)
    assert [(t, m, n) for _, t, m, n in backend.sent] == [(0.0, 32, 1), (0.0, 32, 1)]  # two chunks, greedy
    assert (backend.config.temperature, backend.config.max_tokens) == (1.0, 512)  # its own settings back
    sent = [p for prompts, *_ in backend.sent for p in prompts]
    assert [p.messages[0]["content"][1]["text"] for p in sent] == [official[pid]["query"] for pid in PIDS]
    assert [p.messages[0]["content"][0] for p in sent] == [{"type": "image"}] * 4
    assert [p.images for p in sent] == [[str(testmini.parent / official[pid]["image"])] for pid in PIDS]
    predictions = [json.loads(line) for line in (tmp_path / "ev" / PREDICTIONS_FILE).read_text().splitlines()]
    right = [row["true_false"] for row in predictions]
    assert [row["pid"] for row in predictions] == list(PIDS)
    assert right == [official[pid]["answer"] == row["prediction"] for pid, row in zip(PIDS, predictions)]
    scores = json.loads((tmp_path / "ev" / SCORES_FILE).read_text())
    assert scores["average"]["correct"] == sum(right) and scores["average"]["total"] == 4
    assert metrics["eval/mathvista/accuracy"] == sum(right) / 4
    assert metrics["eval/mathvista/question_type/free_form"] == sum(right[:2]) / 2


def test_finished_eval_is_reused_and_other_settings_refused(testmini, policy, tmp_path):
    problems = load_eval_problems("mathvista", testmini)
    first = run_eval(problems, RecordingBackend(policy, {"3": "(C)"}), tmp_path / "ev", "mathvista",
                     max_tokens=16, quiet=True)
    again = RecordingBackend(policy, {})
    assert run_eval(problems, again, tmp_path / "ev", "mathvista", max_tokens=16, quiet=True) == first
    assert again.sent == []
    with pytest.raises(RunFolderError, match="eval.max_tokens"):
        run_eval(problems, again, tmp_path / "ev", "mathvista", max_tokens=17, quiet=True)


def test_a_killed_eval_resumes_from_its_finished_chunks(testmini, policy, tmp_path):
    problems = load_eval_problems("mathvista", testmini)
    answers = {"1": "1.2", "2": "7", "3": "(C)", "5": "(B)"}

    class Killed(RecordingBackend):
        def generate(self, prompts, num_samples=None, seed=None):
            if self.sent:
                raise KeyboardInterrupt
            return super().generate(prompts, num_samples, seed)

    with pytest.raises(KeyboardInterrupt):
        run_eval(problems, Killed(policy, answers), tmp_path / "ev", "mathvista", max_tokens=8, chunk_size=2)
    resumed = RecordingBackend(policy, answers)
    metrics = run_eval(problems, resumed, tmp_path / "ev", "mathvista", max_tokens=8, chunk_size=2, quiet=True)
    assert [[p.prompt_id for p in prompts] for prompts, *_ in resumed.sent] == [["3", "5"]]
    whole = run_eval(problems, RecordingBackend(policy, answers), tmp_path / "ev2", "mathvista", max_tokens=8,
                     chunk_size=2, quiet=True)
    assert metrics == whole
    assert (tmp_path / "ev" / PREDICTIONS_FILE).read_bytes() == (tmp_path / "ev2" / PREDICTIONS_FILE).read_bytes()


def test_mmmu_rows_interleave_their_images(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def png(colour):
        import io

        buffer = io.BytesIO()
        Image.new("RGB", (28, 28), colour).save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    rows = [{"id": "validation_Math_1", "question": "Compare <image 1> with <image 2>. Which is larger?",
             "options": "['the first', 'the second']", "answer": "B", "question_type": "multiple-choice",
             "image_1": png("red"), "image_2": png("blue")},
            {"id": "validation_Math_2", "question": "How many sides?", "options": "[]", "answer": "4",
             "question_type": "open", "image_1": png("green"), "image_2": None}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "validation-00000.parquet")
    first, second = load_eval_problems("mmmu", tmp_path, image_cache=tmp_path / "cache")
    assert [part.get("text", "image") for part in first.prompt.messages[0]["content"]] == [
        "Compare", "image", "with", "image", ". Which is larger?\n(A) the first\n(B) the second\n\n"
        "Answer with the option's letter from the given choices directly."]
    assert [Image.open(p).getpixel((0, 0)) for p in first.prompt.images] == [(255, 0, 0), (0, 0, 255)]
    assert second.prompt.messages[0]["content"][0] == {"type": "image"}  # not named in the text: first
    assert first.row["options"] == ["the first", "the second"]
    rows[1]["question"] = "How many sides has <image 2>?"
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "validation-00000.parquet")
    with pytest.raises(MpoError, match=r"validation-00000.parquet:row 1: field 'image_2': missing"):
        load_eval_problems("mmmu", tmp_path, image_cache=tmp_path / "cache")


def test_answers_rows_and_one_line_errors(tmp_path):
    Image.new("RGB", (28, 28), "red").save(tmp_path / "red.png")
    row = {"prompt_id": "p1", "messages": [{"role": "user", "content": [{"type": "image"},
                                                                        {"type": "text", "text": "Colour?"}]}],
           "images": ["red.png"], "answer": "B", "choices": ["blue", "red"], "category": "colour"}
    (tmp_path / "ok.jsonl").write_text(json.dumps(row) + "\n")
    (problem,) = load_eval_problems("answers", tmp_path / "ok.jsonl")
    assert problem.row == {"id": "p1", "answer": "B", "choices": ["blue", "red"], "category": "colour"}
    del row["answer"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({**row, "answer": "A", "prompt_id": "p0"}) + "\n"
                                        + json.dumps(row) + "\n")
    with pytest.raises(MpoError, match=r"bad.jsonl:2: field 'answer': missing"):
        load_eval_problems("answers", tmp_path / "bad.jsonl")
    with pytest.raises(MpoError, match="--benchmark 'mathvist'"):
        load_eval_problems("mathvist", tmp_path / "ok.jsonl")
    (tmp_path / "images").mkdir()
    (tmp_path / "testmini.json").write_text(json.dumps({"9": {"pid": "9", "question": "q", "image": "images/9.jpg",
                                                              "question_type": "free_form", "answer_type": "integer",
                                                              "answer": "1"}}))
    with pytest.raises(MpoError, match=r"testmini.json: pid '9': field 'image'"):
        load_eval_problems("mathvista", tmp_path / "testmini.json")


def test_mathvista_parquet_images_and_mmmu_scores(testmini, policy, tmp_path):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = json.loads(testmini.read_text())
    for row in rows.values():  # the Hugging Face form: the image's bytes in decoded_image
        buffer = io.BytesIO()
        Image.open(testmini.parent / row["image"]).save(buffer, format="PNG")
        row["decoded_image"] = {"bytes": buffer.getvalue(), "path": None}
    (tmp_path / "hf").mkdir()
    pq.write_table(pa.Table.from_pylist(list(rows.values())), tmp_path / "hf" / "testmini-00000.parquet")
    from_json = load_eval_problems("mathvista", testmini)
    from_parquet = load_eval_problems("mathvista", tmp_path / "hf", image_cache=tmp_path / "cache")
    assert [p.prompt.messages for p in from_parquet] == [p.prompt.messages for p in from_json]
    assert [Image.open(p.prompt.images[0]).getpixel((0, 0)) for p in from_parquet] == \
        [Image.open(p.prompt.images[0]).convert("RGB").getpixel((0, 0)) for p in from_json]
    assert "decoded_image" not in from_parquet[0].row

    mmmu_row = {"id": "validation_Math_1", "question": "<image 1> Which?", "options": "['x', 'y']", "answer": "B",
                "question_type": "multiple-choice", "image_1": rows["1"]["decoded_image"]}
    pq.write_table(pa.Table.from_pylist([mmmu_row, {**mmmu_row, "id": "validation_Art_1", "answer": "A"}]),
                   tmp_path / "validation.parquet")
    problems = load_eval_problems("mmmu", tmp_path / "validation.parquet", image_cache=tmp_path / "cache")
    backend = RecordingBackend(policy, {"validation_Math_1": "(B)", "validation_Art_1": "(B)"})
    metrics = run_eval(problems, backend, tmp_path / "mmmu", "mmmu", max_tokens=8, quiet=True)
    scores = json.loads((tmp_path / "mmmu" / SCORES_FILE).read_text())
    assert scores["Overall"] == {"num": 2, "acc": 0.5} and scores["Math"] == {"num": 1, "acc": 1.0}
    assert metrics["eval/mmmu/accuracy"] == 0.5 and metrics["eval/mmmu/subject/Art"] == 0.0
    assert metrics["eval/mmmu/discipline/Science"] == 1.0
