"""A run folder of ``mpo iterate``: where each round's files are, which policy and reference a round
uses, and the keys that say what made each stage's output (:func:`mpo.stages.check_key`).

Run folder (``run.output_dir``)::

    config.yaml                  resolved recipe
    round_000/rollouts.jsonl     Rollout records         (chunked, resumable: rollouts.jsonl.parts/)
    round_000/scored.jsonl       ScoredRollout records   (chunked, resumable: scored.jsonl.parts/)
    round_000/pairs.jsonl        PreferencePair records
    round_000/pair_stats.json    pairs kept / dropped by reason, margin histogram
    round_000/<stage>.key.json   what made the stage's output (and train/run_key.json)
    round_000/train/             mpo train's folder: ref_logps.jsonl, checkpoints, metrics.jsonl, policy/
    round_000/manifest.json      written last: the round is finished
    summary.json, plots/*.png    per-round curves

Round ``n`` rolls out from ``round_{n-1}/train/policy`` (round 0 from ``model.policy``).
"""

from __future__ import annotations

import json
from pathlib import Path

from mpo.config import Recipe
from mpo.errors import MpoError
from mpo.models import folder_identity
from mpo.records import Prompt
from mpo.stages import check_key, digest, records_digest

# The settings that change what a stage makes (beyond its inputs and models); the rest (logging,
# W&B, engine memory, parallel layout, iterate.rounds) may change between runs of one folder.
ROLLOUT_SETTINGS = ("rollout.backend", "rollout.num_samples", "rollout.temperature", "rollout.top_p",
                    "rollout.max_tokens", "rollout.seed", "rollout.max_model_len", "rollout.on_too_long",
                    "model.dtype", "model.attn_implementation", "model.min_pixels", "model.max_pixels",
                    "iterate.rollout_chunk")
SCORE_SETTINGS = ("model.dtype", "model.attn_implementation", "model.min_pixels", "model.max_pixels",
                  "iterate.score_chunk")
TRAIN_SETTINGS = ("loss", "train", "model.dtype", "model.attn_implementation", "model.min_pixels",
                  "model.max_pixels", "run.seed", "iterate.reference")
STAGES = ("rollouts.jsonl", "scored.jsonl", "pairs.jsonl", "train", "manifest.json")


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
                raise MpoError("model.policy: the starting policy folder is required")
            return Path(self.recipe.model.policy)
        manifest = self.manifest(n - 1)
        if manifest is None:
            raise MpoError(f"round {n - 1} is not finished ({self.file(n - 1, 'manifest.json')} missing)")
        return Path(manifest["policy_out"])

    def reference(self, n: int) -> Path:
        return self.policy(0) if self.recipe.iterate.reference == "fixed" else self.policy(n)

    def manifest(self, n: int) -> dict | None:
        path = self.file(n, "manifest.json")
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None

    def redo(self, n: int, stage: str) -> str:
        """What to delete to make round ``n``'s ``stage`` again (it, what follows it, later rounds)."""
        names = STAGES[STAGES.index(stage):]
        later = f" and every round after {self.round_dir(n).name}" if n + 1 < self.recipe.iterate.rounds else ""
        return f"{self.round_dir(n)}/{{{','.join(n.split('.')[0] for n in names)}}}*{later}"

    def check_finished(self, prompts: list[Prompt]) -> None:
        """Compare every finished or partial stage's key with this run's before anything is written
        (so a refused run leaves the folder, ``config.yaml`` included, as it was)."""
        from mpo.stages import key_path
        from mpo.training import KEY_FILE

        for n in range(self.recipe.iterate.rounds):
            stages = [("rollouts.jsonl", self.rollout_key), ("scored.jsonl", self.score_key),
                      ("pairs.jsonl", self.pairs_key)]
            for name, key in stages:
                if key_path(self.file(n, name)).exists():
                    check_key(self.file(n, name), key(n, prompts), self.redo(n, name))
            if (self.file(n, "train") / KEY_FILE).exists():
                check_key(self.file(n, "train"), self.train_key(n, prompts), self.redo(n, "train"),
                          key_file=self.file(n, "train") / KEY_FILE)
            if self.manifest(n) is None:
                return

    def settings(self, names) -> dict:
        """``{"section.key": value}`` of the named settings (a bare section name: all of it)."""
        dump = self.recipe.model_dump(mode="json")
        out = {}
        for name in names:
            section, _, key = name.partition(".")
            value = dump[section] if not key else dump[section][key]
            out.update({f"{section}.{k}": v for k, v in value.items()} if not key else {name: value})
        return out

    def rollout_key(self, n: int, prompts: list[Prompt]) -> dict:
        return {"round": n, "policy": folder_identity(self.policy(n)), "prompts": records_digest(prompts),
                **self.settings(ROLLOUT_SETTINGS)}

    def score_key(self, n: int, prompts: list[Prompt]) -> dict:
        return {"rollouts": digest(self.rollout_key(n, prompts)),
                "model.reward_model": folder_identity(self.recipe.model.reward_model or ""),
                **self.settings(SCORE_SETTINGS)}

    def pairs_key(self, n: int, prompts: list[Prompt]) -> dict:
        return {"scored": digest(self.score_key(n, prompts)), **self.settings(["pairs"])}

    def train_key(self, n: int, prompts: list[Prompt]) -> dict:
        return {"pairs": digest(self.pairs_key(n, prompts)), "policy": folder_identity(self.policy(n)),
                "reference": folder_identity(self.reference(n)), **self.settings(TRAIN_SETTINGS)}
