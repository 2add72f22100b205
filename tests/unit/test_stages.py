"""Chunked, resumable stage outputs: a crash keeps finished chunks, a restart redoes only the rest."""

import pytest

from mpo.records import Rollout
from mpo.rounds.chunks import chunk_seed, parts_dir, run_chunked


def _rollouts(chunk, seed, calls):
    calls.append(list(chunk))
    return [Rollout(p, 0, f"{p}-{seed}", 1, "stop", "pi") for p in chunk]


def test_finished_stage_is_not_recomputed(tmp_path):
    out, calls = tmp_path / "rollouts.jsonl", []
    first = run_chunked(list("abcde"), out, Rollout, lambda c, s: _rollouts(c, s, calls), chunk_size=2, seed=7)
    assert [r.prompt_id for r in first] == list("abcde")
    assert calls == [["a", "b"], ["c", "d"], ["e"]]
    assert not parts_dir(out).exists()
    again = run_chunked(list("abcde"), out, Rollout, lambda c, s: _rollouts(c, s, calls), chunk_size=2, seed=7)
    assert again == first and len(calls) == 3


def test_crash_mid_stage_resumes_with_identical_records(tmp_path):
    calls = []
    reference = run_chunked(list("abcde"), tmp_path / "ref.jsonl", Rollout,
                            lambda c, s: _rollouts(c, s, []), chunk_size=2, seed=7)

    def crash_on_third(chunk, seed):
        if chunk == ["e"]:
            raise KeyboardInterrupt("killed")
        return _rollouts(chunk, seed, calls)

    out = tmp_path / "rollouts.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run_chunked(list("abcde"), out, Rollout, crash_on_third, chunk_size=2, seed=7)
    assert not out.exists()
    assert sorted(p.name for p in parts_dir(out).iterdir()) == ["00000.jsonl", "00001.jsonl", "layout.json"]
    # a half-written temporary file from the kill is never trusted
    (parts_dir(out) / ".00002.jsonl.x.tmp").write_text('{"prompt_id": "e"')
    calls.clear()
    resumed = run_chunked(list("abcde"), out, Rollout, lambda c, s: _rollouts(c, s, calls), chunk_size=2, seed=7)
    assert calls == [["e"]]
    assert resumed == reference


def test_changed_chunking_is_refused(tmp_path):
    out = tmp_path / "rollouts.jsonl"

    def crash(chunk, seed):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_chunked(list("abc"), out, Rollout, crash, chunk_size=2)
    with pytest.raises(ValueError, match="finished chunks were made with"):
        run_chunked(list("abc"), out, Rollout, crash, chunk_size=1)


def test_chunk_seed_is_stable_and_distinct():
    assert chunk_seed(0, 1) == chunk_seed(0, 1)
    assert len({chunk_seed(0, i) for i in range(100)}) == 100
    assert 0 <= chunk_seed(123, "round", 4) < 2**31


def test_last_complete_checkpoint_passes_over_a_cut_short_one(tmp_path):
    from mpo.keys import last_complete_checkpoint

    assert last_complete_checkpoint(tmp_path / "missing") is None
    for step, state in [(2, '{"global_step": 2}'), (4, '{"global_step": 4}'), (6, '{"global_st'), (8, None)]:
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-x").mkdir()
    # 8 has no trainer_state.json yet, 6 was killed mid-write: 4 is the newest complete one
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
