"""Records: JSONL round trips, atomic writes and file:line errors."""

import json

import pytest

from mpo.records import (
    PreferencePair,
    Prompt,
    RecordError,
    Rollout,
    ScoredRollout,
    read_jsonl,
    write_json,
    write_jsonl,
)

MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]


@pytest.mark.parametrize(
    "record",
    [
        Prompt("p1", MESSAGES, ["a.png"], answer="red"),
        Prompt("p2", [{"role": "user", "content": "text only"}]),
        Rollout("p1", 3, "It is red.", 5, "stop", "round_000"),
        ScoredRollout("p1", 0, "Blue.", 2, "length", "round_001", reward=-1.25, rule_scores={"answer": 1.0}),
        PreferencePair("p1", MESSAGES, ["a.png"], "Red.", "Blue.", 2.5, -0.5),
        PreferencePair("p9", MESSAGES, [], "x", "y"),
    ],
)
def test_round_trip(tmp_path, record):
    path = tmp_path / "r.jsonl"
    assert write_jsonl(path, [record, record]) == 2
    assert read_jsonl(path, type(record)) == [record, record]


def test_write_is_atomic_and_leaves_no_temp_on_failure(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [Rollout("p", 0, "a", 1, "stop", "pi")])

    def broken():
        yield Rollout("p", 1, "b", 1, "stop", "pi")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_jsonl(path, broken())
    # the earlier finished file is intact and no temporary file is left behind
    assert [r.sample_idx for r in read_jsonl(path, Rollout)] == [0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt_id": "p", "sample_idx": 0', "not valid JSON"),
        ('[1, 2]', "expected a JSON object for Rollout"),
        ('{"prompt_id": "p", "sample_idx": 0, "response": "r", "num_tokens": 1, "finish_reason": "stop"}',
         "missing field 'policy'"),
        ('{"prompt_id": "p", "sample_idx": "0", "response": "r", "num_tokens": 1, "finish_reason": "stop", '
         '"policy": "x"}', "field 'sample_idx': expected int, got str"),
        ('{"prompt_id": "p", "sample_idx": true, "response": "r", "num_tokens": 1, "finish_reason": "stop", '
         '"policy": "x"}', "field 'sample_idx': expected int, got bool"),
        ('{"prompt_id": "p", "sample_idx": 0, "response": "r", "num_tokens": 1, "finish_reason": "stop", '
         '"policy": "x", "extra": 1}', "unknown field 'extra' for Rollout"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt_id": "p", "sample_idx": 0, "response": "r", "num_tokens": 1,
                       "finish_reason": "stop", "policy": "x"})
    _write_lines(path, [good, "", line])
    with pytest.raises(RecordError) as err:
        read_jsonl(path, Rollout)
    assert str(err.value).startswith(f"{path}:3: ")
    assert message in str(err.value)


def test_float_fields_accept_ints_but_not_strings(tmp_path):
    path = tmp_path / "s.jsonl"
    row = {"prompt_id": "p", "sample_idx": 0, "response": "r", "num_tokens": 1, "finish_reason": "stop",
           "policy": "x", "reward": 2, "rule_scores": {"answer": 1}}
    _write_lines(path, [json.dumps(row), json.dumps({**row, "reward": "high"})])
    with pytest.raises(RecordError, match=r":2: field 'reward': expected float"):
        read_jsonl(path, ScoredRollout)


def test_write_json(tmp_path):
    write_json(tmp_path / "m" / "manifest.json", {"stage": "done", "count": 3})
    assert json.loads((tmp_path / "m" / "manifest.json").read_text()) == {"stage": "done", "count": 3}
