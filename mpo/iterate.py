"""The round driver: rollout -> score -> pairs -> MPO (reference log-probs first) -> checkpoint.

Run folder (``run.output_dir``)::

    config.yaml                  resolved recipe
    round_000/rollouts.jsonl     Rollout records         (chunked, resumable: rollouts.jsonl.parts/)
    round_000/scored.jsonl       ScoredRollout records   (chunked, resumable: scored.jsonl.parts/)
    round_000/pairs.jsonl        PreferencePair records
    round_000/pair_stats.json    pairs kept / dropped by reason, margin histogram
    round_000/train/             mpo train's folder: ref_logps.jsonl, checkpoints, metrics.jsonl, policy/
    round_000/manifest.json      written last: the round is finished
    summary.json, plots/*.png    per-round curves

Round ``n`` rolls out from ``round_{n-1}/train/policy`` (round 0 from ``model.policy``). Every stage
writes its file atomically and is skipped when that file exists; rollout and scoring keep finished
chunks; training resumes from the Trainer's last checkpoint. So a run killed at any moment and started
again continues where it stopped and produces the same pairs. Each stage is also a command of its own
(``mpo rollout|score|pairs|train RECIPE --round N``).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from mpo.config import Recipe
from mpo.records import PreferencePair, Prompt, Rollout, ScoredRollout, read_jsonl, write_json, write_jsonl
from mpo.stages import chunk_seed, run_chunked


class RoundLayout:
    """Paths of one run folder."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.run_dir = Path(recipe.run.output_dir)

    def round_dir(self, n: int) -> Path:
        return self.run_dir / f"round_{n:03d}"

    def file(self, n: int, name: str) -> Path:
        return self.round_dir(n) / name

    def policy(self, n: int) -> Path:
        """The policy that round ``n`` rolls out from."""
        if n == 0:
            if not self.recipe.model.policy:
                raise ValueError("model.policy: the starting policy folder is required")
            return Path(self.recipe.model.policy)
        manifest = self.manifest(n - 1)
        if manifest is None:
            raise RuntimeError(f"round {n - 1} is not finished ({self.file(n - 1, 'manifest.json')} missing)")
        return Path(manifest["policy_out"])

    def reference(self, n: int) -> Path:
        return self.policy(0) if self.recipe.iterate.reference == "fixed" else self.policy(n)

    def manifest(self, n: int) -> dict | None:
        path = self.file(n, "manifest.json")
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def load_round_prompts(recipe: Recipe) -> list[Prompt]:
    from mpo.data import load_prompts

    if not recipe.data.prompts:
        raise ValueError("data.prompts: a prompt set (jsonl, parquet or dataset folder) is required")
    loaded = load_prompts(recipe.data.prompts, image_root=recipe.data.image_root,
                          on_bad_image=recipe.data.on_bad_image,
                          image_cache=Path(recipe.run.output_dir) / "image_cache")
    for message in loaded.skipped:
        print(f"skipped (bad image): {message}")
    if loaded.skipped:
        print(f"{len(loaded.skipped)} prompt(s) skipped for bad images, {len(loaded.records)} kept")
    if not loaded.records:
        raise ValueError(f"{recipe.data.prompts}: no usable prompts")
    return loaded.records


def stage_rollout(layout: RoundLayout, n: int, prompts: list[Prompt], backend) -> list[Rollout]:
    """Sample ``rollout.num_samples`` responses per prompt from round ``n``'s policy."""
    recipe = layout.recipe
    out = layout.file(n, "rollouts.jsonl")
    if out.exists():
        return read_jsonl(out, Rollout)
    backend.refresh(layout.policy(n))

    def generate(chunk, seed):
        return backend.generate(chunk, num_samples=recipe.rollout.num_samples, seed=seed)

    return run_chunked(prompts, out, Rollout, generate, chunk_size=recipe.iterate.rollout_chunk,
                       seed=chunk_seed(recipe.rollout.seed, "rollout", n))


def stage_score(layout: RoundLayout, n: int, prompts: list[Prompt], rollouts: list[Rollout], scorer
                ) -> list[ScoredRollout]:
    """Score every rollout with the in-process reward model (empty responses too: pairs counts them)."""
    by_id = {p.prompt_id: p for p in prompts}

    def score(chunk, _seed):
        items = [{"messages": by_id[r.prompt_id].messages, "images": by_id[r.prompt_id].images,
                  "response": r.response, "where": f"{r.prompt_id}#{r.sample_idx}"} for r in chunk]
        rewards = scorer.score(items)
        return [ScoredRollout(**r.__dict__, reward=float(value)) for r, value in zip(chunk, rewards)]

    return run_chunked(rollouts, layout.file(n, "scored.jsonl"), ScoredRollout, score,
                       chunk_size=layout.recipe.iterate.score_chunk)


def stage_pairs(layout: RoundLayout, n: int, prompts: list[Prompt], scored: list[ScoredRollout]):
    from mpo.pairs import build_pairs, read_pair_stats, write_pair_stats

    out, stats_path = layout.file(n, "pairs.jsonl"), layout.file(n, "pair_stats.json")
    if out.exists() and stats_path.exists():
        return read_jsonl(out, PreferencePair), read_pair_stats(stats_path)
    pairs, stats = build_pairs(prompts, scored, layout.recipe.pairs)
    write_pair_stats(stats_path, stats)
    write_jsonl(out, pairs)
    return pairs, stats


def round_recipe(layout: RoundLayout, n: int) -> Recipe:
    """The recipe ``mpo train`` runs for round ``n``: this round's pairs, policy and folder."""
    recipe = layout.recipe.model_copy(deep=True)
    recipe.model.policy = str(layout.policy(n))
    recipe.data.preferences = str(layout.file(n, "pairs.jsonl"))
    recipe.data.image_root = None
    recipe.run.output_dir = str(layout.file(n, "train"))
    recipe.run.seed = chunk_seed(layout.recipe.run.seed, "train", n)
    if layout.recipe.iterate.reference == "fixed" and n > 0:  # round 0 starts from pi_0 anyway
        recipe.train.reference_model = str(layout.reference(n))
    return recipe


def stage_train(layout: RoundLayout, n: int, num_pairs: int) -> Path:
    """MPO on the round's pairs; a round without pairs keeps its policy (counted in the manifest)."""
    from mpo.training import run_training

    policy_dir = layout.file(n, "train") / "policy"
    if (layout.file(n, "train") / "mpo_state.json").exists():  # written after the policy: training finished
        return policy_dir
    if num_pairs == 0:
        print(f"round {n}: no preference pairs (see pair_stats.json); the policy is carried over untrained")
        return layout.policy(n)
    train_dir = layout.file(n, "train")
    resume = any(train_dir.glob("checkpoint-*"))
    print(f"round {n}: MPO on {num_pairs} pairs")
    return run_training(round_recipe(layout, n), resume=resume, quiet=True)


def rollout_metrics(scored: list[ScoredRollout]) -> dict:
    rewards = [s.reward for s in scored]
    deciles = statistics.quantiles(rewards, n=10, method="inclusive") if len(rewards) > 1 else rewards * 9
    return {
        "reward/mean": statistics.fmean(rewards),
        "reward/std": statistics.pstdev(rewards),
        "reward/p10": deciles[0], "reward/p50": deciles[4], "reward/p90": deciles[8],
        "response/tokens_mean": sum(s.num_tokens for s in scored) / len(scored),
        "response/truncated_fraction": sum(s.finish_reason == "length" for s in scored) / len(scored),
        "response/empty": sum(not s.response.strip() for s in scored),
    }


def train_metrics(train_dir: Path) -> dict:
    """Means over the round of the trainer's logged losses, rewards and δ (metrics.jsonl)."""
    path = train_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    keys = [k for k in rows[0] if k.startswith(("loss", "rewards/", "delta"))] if rows else []
    out = {}
    for key in keys:
        values = [row[key] for row in rows if isinstance(row.get(key), (int, float))]
        if values:
            out[f"train/{key}"] = sum(values) / len(values)
    if rows and isinstance(rows[-1].get("delta"), (int, float)):
        out["train/delta_final"] = rows[-1]["delta"]
    return out


def finish_round(layout: RoundLayout, n: int, scored, stats, policy_out: Path, seconds: dict, extra: dict) -> dict:
    metrics = {"round": n, **rollout_metrics(scored), "pairs/kept": stats.pairs_kept,
               "pairs/prompts_with_pairs": stats.prompts_with_pairs,
               **{f"pairs/dropped/{k}": v for k, v in stats.prompts_dropped.items()},
               "pairs/margin_mean": stats.margin_mean,
               **train_metrics(layout.file(n, "train")), **extra,
               **{f"time/{k}_s": round(v, 2) for k, v in seconds.items()}}
    manifest = {"round": n, "policy_in": str(layout.policy(n)), "reference": str(layout.reference(n)),
                "policy_out": str(policy_out), "trained": stats.pairs_kept > 0, "metrics": metrics}
    write_json(layout.file(n, "manifest.json"), manifest)
    return manifest


def run_round(layout: RoundLayout, n: int, prompts: list[Prompt], backend, scorer, extra_metrics=None) -> dict:
    """One round, every finished stage skipped; returns the round's manifest."""
    done = layout.manifest(n)
    if done is not None:
        return done
    seconds = {}
    start = time.perf_counter()
    rollouts = stage_rollout(layout, n, prompts, backend)
    seconds["rollout"], start = time.perf_counter() - start, time.perf_counter()
    scored = stage_score(layout, n, prompts, rollouts, scorer)
    seconds["score"], start = time.perf_counter() - start, time.perf_counter()
    pairs, stats = stage_pairs(layout, n, prompts, scored)
    seconds["pairs"], start = time.perf_counter() - start, time.perf_counter()
    policy_out = stage_train(layout, n, len(pairs))
    seconds["train"] = time.perf_counter() - start
    extra = extra_metrics(prompts, scored) if extra_metrics else {}
    return finish_round(layout, n, scored, stats, policy_out, seconds, extra)


def make_scorer(recipe: Recipe):
    from reward.scorer import Scorer

    if not recipe.model.reward_model:
        raise ValueError("model.reward_model: a reward model folder (Skywork layout) is required")
    return Scorer(recipe.model.reward_model, dtype=recipe.model.dtype,
                  attn_implementation=recipe.model.attn_implementation,
                  min_pixels=recipe.model.min_pixels, max_pixels=recipe.model.max_pixels,
                  allow_empty=True, progress=False)


def run_iterate(recipe: Recipe, extra_metrics=None, backend=None, scorer=None) -> list[dict]:
    """All rounds of ``recipe``; finished rounds and stages are skipped. Returns the manifests."""
    from mpo.config import save_resolved, to_yaml
    from mpo.report import RunReport
    from mpo.rollout import make_backend

    layout = RoundLayout(recipe)
    layout.run_dir.mkdir(parents=True, exist_ok=True)
    print(to_yaml(recipe), end="")
    save_resolved(recipe, layout.run_dir)
    prompts = load_round_prompts(recipe)
    report = RunReport(recipe, layout.run_dir)
    manifests = []
    backend = backend or make_backend(recipe.rollout, recipe.model, layout.policy(0))
    scorer = scorer or make_scorer(recipe)
    try:
        for n in range(recipe.iterate.rounds):
            manifest = run_round(layout, n, prompts, backend, scorer, extra_metrics)
            manifests.append(manifest)
            report.round_done(manifest, layout.file(n, "scored.jsonl"), prompts)
    finally:
        backend.close()
    report.finish(manifests)
    return manifests
