"""``iterate.eval.grpo_every``: the evals of ``iterate.then: grpo``'s policy during training
(:class:`StepEvals`, a ``TrainerCallback`` :func:`mpo.rounds.then_grpo.then_grpo` gives to
:func:`mpo.grpo.run.run_grpo`; the final policy's: :func:`mpo.rounds.then_grpo.final_evals`).

At the end of step ``k`` (``k`` = N, 2N, ... below ``grpo.max_steps``: the final policy is evaluated
from its saved folder afterwards) the model being trained answers ``iterate.eval``'s problems and each
monitor's (:mod:`mpo.rounds.monitors`) greedily, through the hf rollout backend over the model in memory
(:class:`TrainingPolicy`), into ``RUN/grpo/evals/step-00000k/eval/`` and ``.../monitor/<name>/``. Its
metrics join that step's row of the GRPO run's ``metrics.jsonl`` (and W&B): ``eval/<benchmark>/...``,
``monitor/<name>/...``. The eval leaves training as it was (:func:`training_left_alone`: torch's,
Python's and numpy's random states, train mode, the generation config), so a resumed run ends at the
bytes of an uninterrupted one. An eval's key names the policy by the GRPO run's key and the step: an
eval finished before a kill is read back when the resumed run retrains that step (to the same weights),
a partial one continues by chunks. Runs of one process only: a GRPO run of several processes stops at
its start with one line.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from mpo.errors import MpoError
from mpo.grpo.trainer import LoggedCallback
from mpo.rollout.hf import HFBackend
from mpo.rounds.layout import EVAL_DIR, MONITOR_DIR
from mpo.rounds.monitors import evaluate_point, monitor_lines

STEPS_DIR = "evals"  # the GRPO stage's evals in training, one step-NNNNNN/ folder per step


def step_dir(out: Path, step: int) -> Path:
    """Where step ``step``'s evals of the GRPO run in ``out`` go."""
    return Path(out) / STEPS_DIR / f"step-{step:06d}"


def due(step: int, every: int | None, max_steps: int) -> bool:
    """Step ``step``'s policy is evaluated in training: every ``every``-th step before the last."""
    return every is not None and step % every == 0 and step < max_steps


class TrainingPolicy(HFBackend):
    """The hf rollout backend over ``model`` in memory (no weights loaded; ``policy_dir``'s processor),
    named in eval keys by :attr:`policy_identity` (:func:`mpo.rounds.evaluate.eval_key`)."""

    def __init__(self, recipe, policy_dir: Path, model):
        self._given = model
        self.policy_identity: dict = {}
        super().__init__(recipe.rollout, recipe.model, policy_dir, device=str(next(model.parameters()).device))

    def _load(self, policy_dir: Path) -> None:
        from mpo.models import recipe_processor

        self._use(self._given, recipe_processor(policy_dir, self.model_config))


@contextlib.contextmanager
def training_left_alone(model):
    """Inside the block ``model`` is in eval mode and may generate; afterwards its mode, generation
    config and the random states of torch (CPU and CUDA), Python and numpy are as they were."""
    import copy
    import random

    import numpy as np
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    mode, generation = model.training, copy.deepcopy(getattr(base, "generation_config", None))
    python, numpy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
        model.eval()
        try:
            yield
        finally:
            model.train(mode)
            if generation is not None:
                base.generation_config = generation
            random.setstate(python)
            np.random.set_state(numpy)


class StepEvals(LoggedCallback):
    """``iterate.eval.grpo_every``: the evals of the GRPO stage's policy in training (see the module
    docstring). ``recipe``: the run's recipe (its ``iterate`` section); ``out``: the GRPO run folder;
    ``policy_in``: the policy GRPO starts from (its processor encodes the prompts)."""

    def __init__(self, recipe, out: Path, policy_in: Path):
        super().__init__()
        self.recipe, self.out, self.policy_in = recipe, Path(out), Path(policy_in)
        self.every = recipe.iterate.eval.grpo_every
        self.backend: TrainingPolicy | None = None
        self.run_key: str | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        from mpo.keys import KEY_FILE, digest

        if args.world_size > 1:
            raise MpoError(f"iterate.eval.grpo_every: the evals during GRPO run in one process, this GRPO run has "
                           f"{args.world_size}; set iterate.eval.grpo_every=null (the final policy is still "
                           "evaluated)")
        self.run_key = digest(json.loads((self.out / KEY_FILE).read_text(encoding="utf-8")))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if due(state.global_step, self.every, state.max_steps):
            self.pending.update(self.evaluate(model, state.global_step))
            control.should_log = True
        return control

    def evaluate(self, model, step: int) -> dict[str, float]:
        """Step ``step``'s evals of ``model`` (read back where finished); their metrics."""
        from mpo.rounds.evaluate import iterate_spec

        folder = step_dir(self.out, step)
        with training_left_alone(model):
            if self.backend is None:
                self.backend = TrainingPolicy(self.recipe, self.policy_in, model)
            self.backend.policy_identity = {"grpo run": self.run_key, "step": step}
            self.backend.policy = f"grpo step {step}"
            metrics = evaluate_point(
                self.recipe, lambda monitor, problems, out: iterate_spec(self.recipe, self.policy_in, out, monitor)
                .run(problems, self.backend, quiet=True), folder / EVAL_DIR, folder / MONITOR_DIR)
        benchmark = self.recipe.iterate.eval.benchmark
        print(f"GRPO step {step}: held-out {benchmark} accuracy {metrics[f'eval/{benchmark}/accuracy']:.1%} "
              f"-> {folder}", *monitor_lines(self.recipe, metrics, f"GRPO step {step}"), sep="\n")
        return metrics
