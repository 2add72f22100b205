"""A run folder of ``mpo iterate``: where each round's files are, which policy and reference a round
uses, and the keys that say what made each stage's output (:func:`mpo.keys.check_key`).

Run folder (``run.output_dir``)::

    config.yaml                  resolved recipe
    round_000/rollouts.jsonl     Rollout records         (chunked, resumable: rollouts.jsonl.parts/)
    round_000/scored.jsonl       ScoredRollout records   (chunked, resumable: scored.jsonl.parts/)
    round_000/pairs.jsonl        PreferencePair records
    round_000/pair_stats.json    pairs kept / dropped by reason, margin histogram
    round_000/<stage>.key.json   what made the stage's output (and train/run_key.json)
    round_000/train/             mpo train's folder: ref_logps.jsonl, checkpoints, metrics.jsonl, policy/
    round_000/eval_before/       iterate.eval on the initial policy (before round 0's training)
    round_000/eval/              iterate.eval on the round's trained policy: predictions.jsonl, scores.json
                                 (chunked, resumable: rollouts.jsonl.parts/; every `every` rounds, the last)
    round_000/monitor/<name>/    each of iterate.monitors, where eval/ is (monitor_before/<name>/ in round 0)
    round_000/manifest.json      written last: the round is finished
    summary.json, plots/*.png    per-round curves
    .mpo-digests.json            cached file digests for the keys (mpo.keys; only an accelerator)

Round ``n`` rolls out from ``round_{n-1}/train/policy`` (round 0 from ``model.policy``), found
under the run folder as it is now (the manifests' absolute paths record where it was made), and keys
hold models and prompts by content: a run folder copied or moved elsewhere reads back and resumes.
"""

from __future__ import annotations

import json
from pathlib import Path

from mpo.config import Recipe
from mpo.errors import MpoError
from mpo.keys import (
    KEY_FILE,
    PAIRS_SETTINGS,
    ROLLOUT_SETTINGS,
    SCORE_SETTINGS,
    check_key,
    digest,
    legacy_records_digest,
    prompts_identity,
    settings,
)
from mpo.models import folder_identity, legacy_folder_identity
from mpo.records import Prompt

# The settings that change what a stage makes (beyond its inputs and models) are mpo.keys' lists; the
# rest (logging, W&B, engine memory, parallel layout, iterate.rounds) may change between runs of one folder.
# A round's files; STAGES in the order they are made (``train`` is mpo train's folder).
ROLLOUTS_FILE, SCORED_FILE, PAIRS_FILE = "rollouts.jsonl", "scored.jsonl", "pairs.jsonl"
PAIR_STATS_FILE = "pair_stats.json"
MANIFEST_FILE = "manifest.json"  # written last: the round is finished
EVAL_DIR = "eval"  # a round's held-out eval of its trained policy (iterate.eval)
EVAL_BEFORE_DIR = "eval_before"  # round 0's held-out eval of the initial policy
MONITOR_DIR = "monitor"  # iterate.monitors' evals beside eval/, one folder per name (mpo.rounds.monitors)
MONITOR_BEFORE_DIR = "monitor_before"  # round 0's monitors of the initial policy
STAGES = (ROLLOUTS_FILE, SCORED_FILE, PAIRS_FILE, "train", MANIFEST_FILE)


class RoundLayout:
    """Paths of one run folder."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.run_dir = Path(recipe.run.output_dir)
        self._prompts: tuple[list, dict] | None = None  # the prompt list last keyed, and its identity

    def round_dir(self, n: int) -> Path:
        return self.run_dir / f"round_{n:03d}"

    def file(self, n: int, name: str) -> Path:
        return self.round_dir(n) / name

    def policy(self, n: int, recorded: bool = False) -> Path:
        """The policy that round ``n`` rolls out from: round ``n-1``'s trained policy in this run
        folder (or, where round ``n-1`` made no pairs, its own). ``recorded``: the path round
        ``n-1``'s manifest wrote down (where the run was then; what keys of the earlier format hold)."""
        if n == 0:
            if not self.recipe.model.policy:
                raise MpoError("model.policy: the starting policy folder is required")
            return Path(self.recipe.model.policy)
        manifest = self.manifest(n - 1)
        if manifest is None:
            raise MpoError(f"round {n - 1} is not finished ({self.file(n - 1, MANIFEST_FILE)} missing)")
        if recorded:
            return Path(manifest["policy_out"])
        if not manifest.get("trained", True):
            return self.policy(n - 1)
        return self.file(n - 1, "train") / "policy"

    def reference(self, n: int, recorded: bool = False) -> Path:
        return self.policy(0) if self.recipe.iterate.reference == "fixed" else self.policy(n, recorded)

    def manifest(self, n: int) -> dict | None:
        path = self.file(n, MANIFEST_FILE)
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None

    def finished(self) -> bool:
        """Every round of the recipe has its manifest."""
        return all(self.manifest(n) is not None for n in range(self.recipe.iterate.rounds))

    def redo(self, n: int, stage: str) -> str:
        """What to delete to make round ``n``'s ``stage`` again (it, what follows it, later rounds)."""
        names = STAGES[STAGES.index(stage):]
        later = f" and every round after {self.round_dir(n).name}" if n + 1 < self.recipe.iterate.rounds else ""
        return f"{self.round_dir(n)}/{{{','.join(n.split('.')[0] for n in names)}}}*{later}"

    def check_finished(self, prompts: list[Prompt]) -> None:
        """Compare every finished or partial stage's key with this run's before anything is written
        (so a refused run leaves the folder, ``config.yaml`` included, as it was). Rounds and stages
        are checked in order, so a refusal names the earliest stage to redo."""
        from mpo.keys import key_path

        for n in range(self.recipe.iterate.rounds):
            for name in (ROLLOUTS_FILE, SCORED_FILE, PAIRS_FILE):
                if key_path(self.file(n, name)).exists():
                    self.check(n, name, prompts)
            if (self.file(n, "train") / KEY_FILE).exists():
                self.check(n, "train", prompts)
            if self.manifest(n) is None:
                return

    def check(self, n: int, stage: str, prompts: list[Prompt]) -> dict:
        """:func:`mpo.keys.check_key` for round ``n``'s ``stage`` (a file name of :data:`STAGES`, or
        ``train``); returns the key. A training key of today's format that an earlier version wrote
        with its logging settings is accepted while the rest is as it was (``earlier``)."""
        make = {ROLLOUTS_FILE: self.rollout_key, SCORED_FILE: self.score_key,
                PAIRS_FILE: self.pairs_key, "train": self.train_key}[stage]
        key = make(n, prompts)
        key_file = self.file(n, "train") / KEY_FILE if stage == "train" else None
        earlier = (lambda: self.train_key(n, prompts, earlier=True)) if stage == "train" else None
        check_key(self.file(n, stage), key, self.redo(n, stage), key_file=key_file,
                  legacy=lambda: make(n, prompts, legacy=True), earlier=earlier)
        return key

    def repoint_pairs(self, n: int, prompts: list[Prompt], pairs: list) -> list:
        """Round ``n``'s pairs with their images where the prompts' images are now. A run folder moved
        before round ``n`` trained holds pairs naming the images where they were; the keys say the
        prompts' content is the same, so an unfinished round's ``pairs.jsonl`` is rewritten to name
        them where they are (a finished round is only read)."""
        import dataclasses

        from mpo.records import write_jsonl

        images = {p.prompt_id: p.images for p in prompts}
        moved = [dataclasses.replace(pair, images=list(images[pair.prompt_id]))
                 if len(images.get(pair.prompt_id, ())) == len(pair.images) and images[pair.prompt_id] != pair.images
                 else pair for pair in pairs]
        if moved != pairs and self.manifest(n) is None:
            write_jsonl(self.file(n, PAIRS_FILE), moved)
            print(f"{self.file(n, PAIRS_FILE)}: images named where the prompts' images are now (the run was moved)")
            return moved
        return pairs

    def _model(self, path, legacy: bool):
        return legacy_folder_identity(path) if legacy else folder_identity(path)

    def rollout_key(self, n: int, prompts: list[Prompt], legacy: bool = False) -> dict:
        return {"round": n, "policy": self._model(self.policy(n, legacy), legacy),
                "prompts": legacy_records_digest(prompts) if legacy else self._prompts_identity(prompts),
                **settings(self.recipe, ROLLOUT_SETTINGS)}

    def _prompts_identity(self, prompts: list[Prompt]) -> dict:
        """:func:`mpo.keys.prompts_identity`, once per prompt list (every stage key of every round
        holds it)."""
        if self._prompts is None or self._prompts[0] is not prompts:
            self._prompts = (prompts, prompts_identity(prompts))
        return self._prompts[1]

    def score_key(self, n: int, prompts: list[Prompt], legacy: bool = False) -> dict:
        return {"rollouts": self._stage_digest(self.rollout_key(n, prompts, legacy), legacy),
                "model.reward_model": self._model(self.recipe.model.reward_model or "", legacy),
                **settings(self.recipe, SCORE_SETTINGS)}

    def pairs_key(self, n: int, prompts: list[Prompt], legacy: bool = False) -> dict:
        return {"scored": self._stage_digest(self.score_key(n, prompts, legacy), legacy),
                **settings(self.recipe, PAIRS_SETTINGS)}

    def train_key(self, n: int, prompts: list[Prompt], legacy: bool = False, earlier: bool = False) -> dict:
        """Round ``n``'s training: its pairs (their key's digest), policy and reference by content and
        :func:`mpo.train.run.train_settings` (``mpo train``'s, so both agree). ``earlier``: as keys held
        it before logging settings were left out (with ``iterate.reference`` too)."""
        from mpo.train.run import train_settings

        form = "legacy" if legacy else "earlier" if earlier else "today"
        return {"pairs": self._stage_digest(self.pairs_key(n, prompts, legacy), legacy),
                "policy": self._model(self.policy(n, legacy), legacy),
                "reference": self._model(self.reference(n, legacy), legacy),
                **train_settings(self.recipe, form, () if form == "today" else ("iterate.reference",))}

    @staticmethod
    def _stage_digest(key: dict, legacy: bool) -> str:
        """The digest of the stage before's key, as that stage's key file holds it."""
        from mpo.keys import stamped

        return digest(key if legacy else stamped(key))
