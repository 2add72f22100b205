"""The eval sets of a point of ``mpo iterate``: ``iterate.eval`` and the monitors of ``iterate.monitors``.

R1V2 (arXiv 2504.16656) watches hallucination throughout GRPO ("excessive reinforcement signals can
induce visual hallucinations"): any eval set can be named a monitor and is evaluated wherever the
held-out eval is, with the same greedy responses and its own benchmark's rules. At each point
(:func:`evaluate_point`) the held-out eval goes into an ``eval`` folder and each monitor into
``monitor/<name>`` beside it::

    round_000/eval_before/, round_000/monitor_before/<name>/    the initial policy
    round_NNN/eval/, round_NNN/monitor/<name>/                  a round's trained policy
    grpo/evals/step-NNNNNN/eval/, .../monitor/<name>/           GRPO's policy in training (iterate.eval.grpo_every)
    grpo/eval/, grpo/monitor/<name>/                            GRPO's final policy

Metrics: the held-out eval's ``eval/<benchmark>/...`` (:func:`mpo.rounds.evaluate.flat_metrics`), a
monitor's the same renamed ``monitor/<name>/...`` (:func:`renamed`).
"""

from __future__ import annotations

from pathlib import Path

PREFIX = "monitor"  # a monitor's metrics: monitor/<name>/accuracy, ...
_PROBLEMS: dict[tuple, list] = {}  # an eval set's problems, loaded once per process


def eval_sets(recipe) -> list[str | None]:
    """``None`` (``iterate.eval``) then each monitor's name, in the recipe's order; [] without ``iterate.eval``."""
    if recipe.iterate.eval is None:
        return []
    return [None, *recipe.iterate.monitors]


def set_problems(recipe, monitor: str | None) -> list:
    """The problems of ``iterate.eval`` (``monitor`` None) or of a monitor, loaded once in this process."""
    from mpo.rounds.evaluate import iterate_spec

    spec = iterate_spec(recipe, monitor=monitor)
    key = (spec.benchmark, spec.data, spec.split, spec.image_cache)
    if key not in _PROBLEMS:
        _PROBLEMS[key] = spec.problems()
    return _PROBLEMS[key]


def renamed(monitor: str | None, metrics: dict[str, float]) -> dict[str, float]:
    """A monitor's flat metrics ``eval/<benchmark>/<rest>`` named ``monitor/<name>/<rest>``; the held-out
    eval's (``monitor`` None) as they are."""
    if monitor is None:
        return dict(metrics)
    return {f"{PREFIX}/{monitor}/{key.split('/', 2)[2]}": value for key, value in metrics.items()}


def evaluate_point(recipe, run_one, eval_dir: Path, monitor_dir: Path, problems: list | None = None) -> dict:
    """``iterate.eval`` into ``eval_dir`` and each monitor into ``monitor_dir/<name>``; ``run_one(monitor,
    problems, out_dir)`` makes one eval (:func:`mpo.rounds.evaluate.iterate_spec` of ``monitor``) and
    returns its flat metrics. ``problems``: the held-out set's, where the caller has them. Returns every
    set's metrics, the monitors' :func:`renamed`."""
    metrics: dict[str, float] = {}
    for monitor in eval_sets(recipe):
        out = Path(eval_dir) if monitor is None else Path(monitor_dir) / monitor
        given = problems if monitor is None and problems is not None else set_problems(recipe, monitor)
        metrics.update(renamed(monitor, run_one(monitor, given, out)))
    return metrics


def monitor_lines(recipe, metrics: dict[str, float], where: str) -> list[str]:
    """One line per monitor: ``<where>: monitor <name> (<benchmark>) accuracy 41.0%``."""
    return [f"{where}: monitor {name} ({settings.benchmark}) accuracy "
            f"{metrics[f'{PREFIX}/{name}/accuracy']:.1%}" for name, settings in recipe.iterate.monitors.items()
            if f"{PREFIX}/{name}/accuracy" in metrics]
