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


def test_distributed_grpo_stage_is_launched_like_training(tmp_path, monkeypatch):
    """``iterate.then: grpo`` with ``launch.mode: distributed`` (refused before issue 21's GRPO job): the
    stage is an accelerate launch of ``mpo grpo RUN/config.yaml --after-rounds`` with this node's rank in
    the nodes' rendezvous (master_port + 4), the training stage's launch code, logs in RUN/grpo/logs/grpo."""
    from mpo.config import load_recipe
    from mpo.rounds import launch
    from mpo.rounds.runners import LaunchedRunner
    from mpo.rounds.then_grpo import stage_recipe

    recipe = load_recipe(None, [f"run.output_dir={tmp_path}", "iterate.rounds=2", "iterate.then=grpo",
                                "launch.mode=distributed", "launch.nnodes=2", "launch.node_rank=1",
                                "launch.nproc_per_node=2", "launch.master_addr=10.0.0.7", "launch.master_port=29600"])
    jobs = []
    monkeypatch.setattr(launch, "run_stage_job", lambda *job: jobs.append(job) or 1.0)
    (tmp_path / "round_001").mkdir()
    (tmp_path / "round_001" / "manifest.json").write_text('{"round": 1, "trained": true}')
    stage = stage_recipe(recipe)
    assert stage.run.output_dir == str(tmp_path / "grpo")
    assert stage.model.policy == str(tmp_path / "round_001" / "train" / "policy")
    LaunchedRunner(recipe, tmp_path / "config.yaml").grpo(tmp_path / "grpo")
    (name, n, command, topo, log_dir), = jobs
    assert (name, n, log_dir, topo.node_rank) == ("grpo", None, tmp_path / "grpo" / "logs" / "grpo", 1)
    assert command[1:3] == ["-m", "accelerate.commands.launch"]
    assert command[command.index("-m", 3):] == ["-m", "mpo", "grpo", str(tmp_path / "config.yaml"), "--after-rounds"]
    flags = dict(zip(command[3::], command[4::]))
    assert (flags["--num_processes"], flags["--num_machines"], flags["--machine_rank"]) == ("4", "2", "1")
    assert (flags["--main_process_ip"], flags["--main_process_port"]) == ("10.0.0.7", "29604")
