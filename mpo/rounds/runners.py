"""Where a round's rollout, scoring and training run (``launch.mode``).

Both runners have the interface of :class:`StageRunner` (rollout, score, train, evaluate, close).

- :class:`InlineRunner` (``inline``): in this process. The rollout backend and the reward model are
  built when a stage first needs them (a finished run loads neither) and kept across rounds; on a GPU
  they give the memory back between stages: the vLLM engine sleeps (level 1: weights to host
  memory, KV cache dropped) while scoring and training run, the HF policy moves to the CPU, and the
  reward model leaves the GPU while training runs. On a CPU these are no-ops.
- :class:`LaunchedRunner` (``distributed``): each stage of each round is a job of its own
  (:mod:`mpo.rounds.launch`); this process only sequences them, joins each stage's parts and writes the
  round's files. A held-out eval is a job too (its ranks make the greedy responses); this process joins
  them and scores them by the benchmark's rules.

Both produce the same records: chunk c of a stage is made from its items and ``chunk_seed(seed,
c)`` alone, wherever it runs (:func:`mpo.rounds.chunks.run_chunked`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

from mpo.records import Prompt, Rollout, ScoredRollout
from mpo.rounds.chunks import chunk_seed, run_chunked
from mpo.rounds.evaluate import LazyBackend
from mpo.rounds.layout import ROLLOUTS_FILE, SCORED_FILE


def chunk_spec(layout, n: int, stage: str):
    """``(output, record class, chunk size, seed)`` of round ``n``'s rollout or score stage."""
    recipe = layout.recipe
    if stage == "rollout":
        return (layout.file(n, ROLLOUTS_FILE), Rollout, recipe.iterate.rollout_chunk,
                chunk_seed(recipe.rollout.seed, "rollout", n))
    return layout.file(n, SCORED_FILE), ScoredRollout, recipe.iterate.score_chunk, 0


def rollout_chunks(recipe, backend):
    """``process(chunk, seed)`` of the rollout stage: ``rollout.num_samples`` samples per prompt."""
    def generate(chunk, seed):
        return backend.generate(chunk, num_samples=recipe.rollout.num_samples, seed=seed)

    return generate


def score_chunks(prompts, scorer):
    """``process(chunk, seed)`` of the score stage (empty responses are scored too: pairs counts them)."""
    by_id = {p.prompt_id: p for p in prompts}

    def score(chunk, _seed):
        from reward.items import rollout_items

        rewards = scorer.score(rollout_items(by_id, chunk))
        return [ScoredRollout(**r.__dict__, reward=float(value)) for r, value in zip(chunk, rewards)]

    return score


def reward_model_folder(recipe) -> Path:
    """``model.reward_model``'s folder, checked (:func:`mpo.models.model_folder`: once per process)."""
    from mpo.errors import MpoError
    from mpo.models import model_folder

    if not recipe.model.reward_model:
        raise MpoError("model.reward_model: a reward model folder (Skywork layout) is required")
    return model_folder(recipe.model.reward_model, "model.reward_model", reward=True)


def make_scorer(recipe):
    """The run's reward model (a Skywork-layout folder) as a batched scorer."""
    from reward.scorer import ScoreOptions, Scorer

    return Scorer(reward_model_folder(recipe), ScoreOptions.for_rounds(recipe.model))


class StageRunner(ABC):
    """Runs the stages of a round (rollout, score, train) somewhere; each stage's records are the
    same wherever it runs. The driver (:mod:`mpo.rounds.driver`) decides what is due and calls these."""

    @abstractmethod
    def rollout(self, layout, n: int, prompts: list[Prompt]) -> list[Rollout]:
        """Round ``n``'s rollouts of ``prompts`` (written to its ``rollouts.jsonl``)."""

    @abstractmethod
    def score(self, layout, n: int, rollouts: list[Rollout], prompts: list[Prompt]) -> list[ScoredRollout]:
        """Round ``n``'s ``rollouts`` scored by the reward model (written to its ``scored.jsonl``)."""

    @abstractmethod
    def train(self, layout, n: int, round_recipe, key, resume: bool) -> Path:
        """MPO on round ``n``'s pairs (``round_recipe``: :func:`mpo.rounds.driver.round_recipe`); the trained policy."""

    @abstractmethod
    def evaluate(self, problems, policy: Path, out_dir: Path, monitor: str | None = None) -> dict[str, float]:
        """``iterate.eval`` (or the monitor ``iterate.monitors[monitor]``) on ``policy`` into ``out_dir``
        (:func:`mpo.rounds.evaluate.iterate_spec`, :func:`mpo.rounds.evaluate.run_eval`); flat metrics."""

    @abstractmethod
    def close(self) -> None:
        """Give back what the runner holds (a rollout engine); called once, after the last stage."""


class EngineView:
    """The runner's rollout engine as :func:`mpo.rounds.evaluate.run_eval` sees it, serving ``policy``:
    made, woken and refreshed to it (as the next round's rollout would) only when asked to generate, so
    a finished eval loads nothing. Its sampling settings apply for that call only; the engine's own are
    back afterwards."""

    def __init__(self, runner: InlineRunner, policy: Path):
        from mpo.rollout.base import check_policy_dir

        self.runner, self.policy_dir = runner, check_policy_dir(policy)
        self.config, self.model_config = runner.recipe.rollout, runner.recipe.model

    def generate(self, prompts, num_samples=None, seed=None) -> list[Rollout]:
        engine = self.runner._policy_backend(self.policy_dir)
        saved, engine.config = engine.config, self.config
        try:
            return engine.generate(prompts, num_samples=num_samples, seed=seed)
        finally:
            engine.config = saved


class InlineRunner(StageRunner):
    """Every stage in this process (see the module docstring)."""

    def __init__(self, recipe, backend=None, scorer=None):
        self.recipe, self._backend, self._scorer = recipe, backend, scorer

    def _policy_backend(self, policy: Path):
        if self._backend is None:
            from mpo.rollout import make_backend

            self._backend = make_backend(self.recipe.rollout, self.recipe.model, policy)
        self._backend.wake()
        self._backend.refresh(policy)
        return self._backend

    def _reward_scorer(self):
        if self._backend is not None:
            self._backend.sleep()
        self._scorer = self._scorer or make_scorer(self.recipe)
        return self._scorer

    def _chunked(self, layout, n: int, stage: str, items, process):
        out, cls, size, seed = chunk_spec(layout, n, stage)
        return run_chunked(items, out, cls, process, chunk_size=size, seed=seed, desc=f"round {n} {stage}")

    def rollout(self, layout, n: int, prompts: list[Prompt]) -> list[Rollout]:
        return self._chunked(layout, n, "rollout", prompts,
                             rollout_chunks(self.recipe, self._policy_backend(layout.policy(n))))

    def score(self, layout, n: int, rollouts: list[Rollout], prompts: list[Prompt]) -> list[ScoredRollout]:
        return self._chunked(layout, n, "score", rollouts, score_chunks(prompts, self._reward_scorer()))

    def train(self, layout, n: int, round_recipe, key, resume: bool) -> Path:
        from mpo.train.run import run_training

        if self._backend is not None:
            self._backend.sleep()
        if self._scorer is not None:
            self._scorer.offload()
        return run_training(round_recipe, resume=resume, quiet=True, key=key)

    def evaluate(self, problems, policy: Path, out_dir: Path, monitor: str | None = None) -> dict[str, float]:
        from mpo.rounds.evaluate import iterate_spec

        return iterate_spec(self.recipe, policy, out_dir, monitor).run(problems, EngineView(self, policy))

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
        if self._scorer is not None:  # off the accelerator: a GRPO stage (iterate.then) may follow
            self._scorer.offload()


class LaunchedRunner(StageRunner):
    """Every stage a job of its own (see :mod:`mpo.rounds.launch`); ``config`` is the run's resolved recipe."""

    def __init__(self, recipe, config: Path):
        from mpo.rounds.launch import topology

        self.recipe, self.config = recipe, Path(config)
        self.topology = topology(recipe.launch)
        self.seconds: dict[tuple[int, str], float] = {}

    def launch(self, layout, n: int, stage: str) -> None:
        """Round ``n``'s ``stage`` as a job; returns when it has ended (its seconds in :attr:`seconds`)."""
        self._job(stage, n, layout.round_dir(n) / "logs" / stage)

    def _job(self, stage: str, n: int | None, log_dir: Path, rank_args: list[str] | None = None) -> None:
        from mpo.rounds.launch import run_stage_job, stage_command

        command = stage_command(stage, self.config, n, self.recipe, self.topology, log_dir, rank_args)
        self.seconds[(n, stage)] = run_stage_job(stage, n, command, self.topology, log_dir)

    def launch_eval(self, spec, log_dir: Path | None = None) -> None:
        """The eval ``spec`` (:class:`mpo.rounds.evaluate.EvalSpec`) as a job whose ranks make its responses
        (``python -m mpo.rounds.rank eval``); its logs in ``log_dir`` (default: a round's ``logs/eval``,
        ``logs/eval_before``: ``logs/`` beside the eval's folder, named after it)."""
        out_dir = Path(spec.out_dir)
        self._job("eval", None, log_dir or out_dir.parent / "logs" / out_dir.name, spec.argv())

    def evaluate_spec(self, spec, problems, log_dir: Path | None = None) -> dict[str, float]:
        """The eval ``spec`` of ``problems``: its key checked here (written the first time), its responses
        made by a job (:meth:`launch_eval`; none once they are joined), joined and scored in this process
        (:meth:`mpo.rounds.evaluate.EvalSpec.run`). A finished eval is read back and launches nothing."""
        joined = JoinedResponses(self.recipe.rollout, self.recipe.model, spec.policy)
        if spec.check(problems, joined) is None and not (Path(spec.out_dir) / ROLLOUTS_FILE).exists():
            self.launch_eval(spec, log_dir)
        return spec.run(problems, joined)

    def evaluate(self, problems, policy: Path, out_dir: Path, monitor: str | None = None) -> dict[str, float]:
        from mpo.rounds.evaluate import iterate_spec

        return self.evaluate_spec(iterate_spec(self.recipe, policy, out_dir, monitor), problems)

    def _joined(self, layout, n: int, stage: str, items):
        """The stage's job launched, then its parts joined (every chunk must be there)."""
        out, cls, size, seed = chunk_spec(layout, n, stage)
        self.launch(layout, n, stage)

        def missing(chunk, _seed):
            raise RuntimeError(f"{out}: the {stage} job ended without writing all its chunks")

        return run_chunked(items, out, cls, missing, chunk_size=size, seed=seed)

    def rollout(self, layout, n: int, prompts: list[Prompt]) -> list[Rollout]:
        return self._joined(layout, n, "rollout", prompts)

    def score(self, layout, n: int, rollouts: list[Rollout], prompts: list[Prompt]) -> list[ScoredRollout]:
        return self._joined(layout, n, "score", rollouts)

    def train(self, layout, n: int, round_recipe, key, resume: bool) -> Path:
        self.launch(layout, n, "train")
        return Path(round_recipe.run.output_dir) / "policy"

    def grpo(self, out: Path) -> None:
        """``iterate.then: grpo``'s GRPO stage into ``out`` (``RUN/grpo``) as a job launched like training
        (each rank :func:`mpo.rounds.then_grpo.grpo_rank`); its logs in ``out/logs/grpo``."""
        self._job("grpo", None, out / "logs" / "grpo", ["--after-rounds"])

    def close(self) -> None:
        pass  # each job gave back its own


class JoinedResponses(LazyBackend):
    """A distributed eval's responses as :func:`mpo.rounds.evaluate.run_eval` sees them in the driver: the
    policy and settings its key holds; the ranks made every chunk, so none is made (or loaded) here."""

    def generate(self, prompts, num_samples=None, seed=None):
        raise RuntimeError("the eval job ended without writing all its chunks")


def make_runner(recipe, config: Path, backend=None, scorer=None) -> StageRunner:
    """The runner ``launch.mode`` names: :class:`InlineRunner` or :class:`LaunchedRunner`."""
    if recipe.launch.mode == "distributed":
        return LaunchedRunner(recipe, config)
    return InlineRunner(recipe, backend, scorer)
