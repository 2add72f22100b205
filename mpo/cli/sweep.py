"""Grid sweeps: one ``mpo train`` per point of a cartesian grid of recipe values (loss-weight, β, δ,
learning-rate ablations), then one table and one plot comparing the points.

``mpo sweep RECIPE --grid KEY=VALUES [--grid KEY=VALUES ...] [overrides]``

- ``--grid`` names a recipe key and its values, separated by commas (or semicolons) outside brackets
  and quotes; each value is typed as YAML types it, exactly like an override:
  ``--grid 'loss.weights=[0.8,0.2,1.0],[1,0,0]' --grid loss.beta=0.1,0.2`` is 2 x 2 = 4 points.
- Point ``i`` trains in ``run.output_dir/<name>/``, the name made of the values
  (``weights=0.8-0.2-1__beta=0.1``). A point that finished with the same pairs and settings
  (``mpo train``'s own test, :func:`mpo.keys.finished`) is skipped; others go to ``mpo train``: one
  with checkpoints resumes from them (refused if they were made with other settings). So rerunning
  the same command finishes a sweep.
- In process (the default) the points run one after another and share one reference log-prob cache
  (``run.output_dir/ref_logps.jsonl``: the reference policy and pairs are the same for every point).
  ``--launch "accelerate launch --config_file recipes/accelerate/ddp.yaml -m"`` runs each point as
  its own ``LAUNCH mpo train ...`` process instead; ``--print-commands`` prints those commands
  (e.g. for a job array) and runs nothing; ``--report-only`` only rebuilds the table and plot.
- With ``run.report_to: wandb`` every point is a W&B run in one group (``run.wandb_group`` = the
  sweep name, ``--name``, default the output folder's name), named after its point.
- ``run.output_dir/sweep.csv``: one row per point: the grid values, status, and the **mean over the
  last ``--tail`` logged optimizer steps** (default 5; all steps when fewer were logged) of the
  reward margin and accuracy, the total loss and each loss part, δ and the chosen / rejected
  rewards, from the point's ``metrics.jsonl``. ``sweep.png`` plots margin, accuracy and loss parts
  per point.

With ``iterate.eval`` in the recipe each point's policy is evaluated on that held-out set and the
points are ranked by its accuracy (:mod:`mpo.cli.sweep_report`).

``--command iterate`` sweeps ``mpo iterate`` instead: each point runs every round of the recipe in
``run.output_dir/<name>/`` (:func:`mpo.rounds.driver.run_iterate` in process, or
``LAUNCH mpo iterate RECIPE ...``), e.g. R1V2's reward-gap threshold,
``mpo sweep recipes/r1v_mpo.yaml --command iterate --grid pairs.min_margin=7,10,15``. Every point goes
to ``mpo iterate``, which resumes an unfinished run and reads a finished one back after checking its
stages' keys (nothing is recomputed; status ``skipped``); ``--print-commands`` lists the points not
yet finished. ``--launch`` is then a prefix for a whole run (``python -m``, ``srun -N1 python -m``),
not ``accelerate launch``: with ``launch.mode: distributed`` iterate launches each stage itself. With
``iterate.eval`` (each round's held-out eval is iterate's own), ``sweep.csv`` holds one row per point
and rounds trained and ``sweep.png`` plots held-out accuracy against rounds, one line per point, the
points ranked by the last round's accuracy (:mod:`mpo.cli.sweep_rounds`); ``--tail`` does not apply.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from mpo.cli_common import guarded
from mpo.errors import MpoError

METRICS = ("rewards/margins", "rewards/accuracies", "loss", "loss/preference", "loss/quality", "loss/generation",
           "delta", "rewards/chosen", "rewards/rejected")
RESERVED = ("run.output_dir",)  # each point's folder is the sweep's to choose
_MAX_NAME = 100


@dataclass
class Point:
    name: str
    values: dict[str, Any]  # grid key -> value as the resolved recipe holds it
    overrides: list[str]  # everything after the recipe on this point's `mpo train|iterate` command line
    out_dir: Path
    recipe: Any = None  # the resolved mpo.config.Recipe
    status: str = "pending"  # -> trained | iterated | skipped (finished earlier)
    command: str = "train"  # what runs the point: mpo train, or mpo iterate


@dataclass
class Sweep:
    recipe_path: Path
    name: str
    root: Path
    keys: list[str]
    points: list[Point] = field(default_factory=list)
    command: str = "train"  # train | iterate


def split_values(text: str) -> list[str]:
    """``'[0.8,0.2,1.0],[1,0,0]'`` -> ``['[0.8,0.2,1.0]', '[1,0,0]']``: split on ``,`` / ``;`` outside
    brackets, braces and quotes."""
    parts, depth, quote, current = [], 0, None, []
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char in ",;" and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    parts.append("".join(current).strip())
    return parts


def parse_grid(specs: list[str]) -> list[tuple[str, list[str]]]:
    """``["loss.beta=0.1,0.2", ...]`` -> ``[("loss.beta", ["0.1", "0.2"]), ...]`` (values as written)."""
    from mpo.config import ConfigError

    if not specs:
        raise ConfigError("--grid: give at least one KEY=VALUES, e.g. --grid loss.beta=0.1,0.2")
    grid = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--grid {spec!r}: expected KEY=VALUE1,VALUE2,... (e.g. loss.beta=0.1,0.2)")
        if key in RESERVED:
            raise ConfigError(f"--grid {key}: reserved (each point trains in run.output_dir/<point name>)")
        if any(key == seen for seen, _ in grid):
            raise ConfigError(f"--grid {key}: given twice; put all its values in one --grid")
        pieces = split_values(values)
        if any(not p for p in pieces):
            raise ConfigError(f"--grid {key}: empty value in {values!r}")
        grid.append((key, pieces))
    return grid


def check_grid_key(key: str, tree: dict) -> None:
    """Fail with one line unless ``key`` names a setting of the recipe (``tree``: its dump)."""
    from mpo.config import ConfigError

    node: Any = tree
    for depth, part in enumerate(key.split(".")):
        if node is None:  # e.g. train.lora.r while train.lora is null: the override creates it
            return
        if not isinstance(node, dict) or part not in node:
            where = ".".join(key.split(".")[:depth]) or "the recipe"
            valid = ", ".join(node) if isinstance(node, dict) else "(none: not a section)"
            raise ConfigError(f"--grid {key}: unknown key; valid keys under {where}: {valid}")
        node = node[part]


def lookup(tree: dict, key: str) -> Any:
    for part in key.split("."):
        tree = tree[part]
    return tree


def format_value(value: Any) -> str:
    """A value as a folder-name part: lists joined with ``-``, floats in ``%g``, unsafe characters
    dropped (``[0.8, 0.2, 1.0]`` -> ``0.8-0.2-1``)."""
    if isinstance(value, (list, tuple)):
        return "-".join(format_value(v) for v in value)
    if isinstance(value, dict):
        return "-".join(f"{k}-{format_value(v)}" for k, v in value.items())
    text = format(value, "g") if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9._+-]", "", text.replace(" ", "")) or "x"


def point_names(keys: list[str], combos: list[tuple[Any, ...]]) -> list[str]:
    """Readable, filesystem-safe, unique folder names: ``beta=0.1__weights=0.8-0.2-1``."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    short = [s if last.count(s) == 1 else k for s, k in zip(last, keys)]
    names, seen = [], set()
    for combo in combos:
        name = "__".join(f"{s}={format_value(v)}" for s, v in zip(short, combo))
        if len(name) > _MAX_NAME:
            name = name[: _MAX_NAME - 9] + "_" + hashlib.sha1(name.encode()).hexdigest()[:8]
        base, n = name, 2
        while name in seen:
            name, n = f"{base}_{n}", n + 1
        seen.add(name)
        names.append(name)
    return names


def plan(recipe_path: Path, grid_specs: list[str], overrides: list[str] = (), name: str | None = None,
         command: str = "train") -> Sweep:
    """Resolve every point of the grid (so a bad key or value stops before anything trains); each point
    runs ``mpo <command>`` (``train`` or ``iterate``)."""
    from mpo.config import ConfigError, current_key, load_recipe

    grid = parse_grid(list(grid_specs))
    base = load_recipe(recipe_path, list(overrides))
    given = {item.split("=", 1)[0].strip() for item in overrides}
    for key, _ in grid:
        check_grid_key(current_key(key), base.model_dump(mode="json"))  # an old key: where it is now
        if key in given:
            raise ConfigError(f"--grid {key}: also given as an override; keep one")
    root = Path(base.run.output_dir)
    sweep = Sweep(Path(recipe_path), name or root.name, root, [k for k, _ in grid], command=command)
    settings, values = [], []
    for combo in itertools.product(*[pieces for _, pieces in grid]):
        setting = [f"{k}={v}" for k, v in zip(sweep.keys, combo)]
        try:
            dumped = load_recipe(recipe_path, [*overrides, *setting]).model_dump(mode="json")
        except ConfigError as err:
            raise ConfigError(f"grid point {' '.join(setting)}: {err}") from None
        settings.append(setting)
        values.append(tuple(lookup(dumped, current_key(k)) for k in sweep.keys))  # as the recipe typed them
    for setting, value, point_name in zip(settings, values, point_names(sweep.keys, values)):
        out = root / point_name
        point_overrides = [*overrides, *setting, f"run.output_dir={out}"]
        if base.run.report_to == "wandb" and "run.wandb_group" not in given:
            point_overrides.append(f"run.wandb_group={sweep.name}")
        recipe = load_recipe(recipe_path, point_overrides)
        sweep.points.append(Point(point_name, dict(zip(sweep.keys, value)), point_overrides, out, recipe, command=command))
    return sweep


def is_finished(point: Point) -> bool:
    """The point's ``mpo train`` run finished with its pairs and settings (:func:`mpo.train.run.is_trained`:
    :func:`mpo.keys.finished`, the test ``mpo train`` itself makes); one made with other settings is not.
    An ``mpo iterate`` point: every round has its manifest (its keys are checked when iterate reads it back)."""
    if point.command == "iterate":
        from mpo.rounds.layout import RoundLayout

        return RoundLayout(point.recipe).finished()
    from mpo.train.run import is_trained

    return is_trained(point.recipe)


def has_checkpoint(out_dir: Path) -> bool:
    from mpo.keys import last_complete_checkpoint

    return last_complete_checkpoint(out_dir) is not None


def point_command(sweep: Sweep, point: Point, launch: str | None) -> list[str]:
    prefix = shlex.split(launch) if launch else []
    if sweep.command == "iterate":  # iterate resumes by itself
        return [*prefix, "mpo", "iterate", str(sweep.recipe_path), *point.overrides]
    resume = ["--resume"] if has_checkpoint(point.out_dir) else []
    return [*prefix, "mpo", "train", str(sweep.recipe_path), *point.overrides, *resume]


def run_points(sweep: Sweep, launch: str | None = None) -> None:
    """Train every unfinished point, in process or one ``LAUNCH mpo train ...`` process each. An
    ``mpo iterate`` point always goes to iterate, which resumes it or reads a finished run back."""
    iterate = sweep.command == "iterate"
    for i, point in enumerate(sweep.points, 1):
        where = f"[{i}/{len(sweep.points)}] {point.name}"
        done = is_finished(point)
        if done and not iterate:
            point.status = "skipped"
            print(f"{where}: finished earlier; skipped (delete {point.out_dir} to retrain)")
            continue
        if done:
            print(f"{where}: every round finished earlier; mpo iterate reads it back (keys checked)", flush=True)
        else:
            print(f"{where}: {'iterating' if iterate else 'training'} in {point.out_dir}", flush=True)
        if launch:
            command = point_command(sweep, point, launch)
            print("$ " + shlex.join(command), flush=True)
            finished = subprocess.run(command, check=False)
            if finished.returncode != 0:
                raise MpoError(f"grid point {point.name}: `{shlex.join(command)}` exited with "
                                   f"status {finished.returncode}")
        else:
            _run_in_process(sweep, point)
        point.status = "skipped" if done else "iterated" if iterate else "trained"


def _run_in_process(sweep: Sweep, point: Point) -> None:
    """``run_training`` (or ``run_iterate``) for one point; its W&B settings are scoped to the point (see
    :func:`mpo.train.setup.wandb_scope`; iterate's run report opens its own W&B run in the point's folder),
    so each point's W&B files land in its own folder."""
    from mpo.train.run import REF_LOGPS_FILE, run_training

    try:
        if sweep.command == "iterate":
            from mpo.cli_common import check_output_folder
            from mpo.rounds.driver import run_iterate

            check_output_folder(point.out_dir, "run.output_dir")
            run_iterate(point.recipe)
        else:
            run_training(point.recipe, resume=has_checkpoint(point.out_dir), ref_cache=sweep.root / REF_LOGPS_FILE)
    finally:
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def final_metrics(metrics_file: Path, tail: int) -> tuple[dict[str, float], int, int]:
    """Means over the last ``tail`` logged training steps -> ``(means, last step, rows averaged)``.
    Steps logged twice (a run resumed from an earlier checkpoint) count once, the later entry."""
    from mpo.train.setup import metric_means, read_metrics

    by_step: dict[int, dict] = {}
    for row in read_metrics(metrics_file):
        if "loss/preference" in row:  # a training log row (not the end-of-training summary)
            by_step[row["step"]] = row
    rows = [by_step[s] for s in sorted(by_step)][-tail:]
    return metric_means(rows, METRICS), (rows[-1]["step"] if rows else 0), len(rows)


def summarize(sweep: Sweep, tail: int = 5) -> list[dict]:
    """One row per point (see the module docstring for what the numbers are)."""
    from mpo.cli.sweep_report import accuracy_key, grid_values, held_out_accuracy, ranked
    from mpo.train.setup import METRICS_FILE

    rows, held_out = [], accuracy_key(sweep.points[0].recipe) if sweep.points else None
    for point in sweep.points:
        means, step, averaged = final_metrics(point.out_dir / METRICS_FILE, tail)
        status = point.status
        if status == "pending":  # --report-only
            status = "finished" if is_finished(point) else "not finished"
        rows.append({"point": point.name, **grid_values(point), "status": status, "steps": step, "steps_averaged": averaged,
                     **({held_out: held_out_accuracy(point)} if held_out else {}),
                     **{k: means.get(k, "") for k in METRICS}, "output_dir": str(point.out_dir)})
    return ranked(rows, held_out)


def report(sweep: Sweep, tail: int = 5) -> list[dict]:
    """Write ``sweep.csv`` and ``sweep.png`` in the sweep folder (main process only)."""
    from mpo.cli.sweep_report import format_table, write_csv, write_plot
    from mpo.cli.sweep_rounds import format_rounds_table, summarize_rounds, write_rounds_plot

    iterate = sweep.command == "iterate"
    rows = summarize_rounds(sweep) if iterate else summarize(sweep, tail)
    if int(os.environ.get("RANK", "0")) == 0 and rows:
        write_csv(rows, sweep.root / "sweep.csv")
        if iterate:
            write_rounds_plot(rows, sweep.root / "sweep.png")
        else:
            write_plot(rows, sweep.root / "sweep.png", tail)
        print(format_rounds_table(rows) if iterate else format_table(rows))
        print(f"sweep table: {sweep.root / 'sweep.csv'}; plot: {sweep.root / 'sweep.png'}")
    return rows


GRID_HELP = ("KEY=VALUES, repeatable; values separated by commas (or ;) outside brackets, typed as YAML, "
             "e.g. --grid 'loss.weights=[0.8,0.2,1.0],[1,0,0]' --grid loss.beta=0.1,0.2")


@guarded
def sweep_command(
    recipe: Annotated[Path, typer.Argument(help="A YAML recipe for mpo train (or mpo iterate: --command iterate).")],
    overrides: Annotated[list[str] | None, typer.Argument(help="Overrides for every point, e.g. train.max_steps=100")] = None,
    grid: Annotated[list[str] | None, typer.Option("--grid", "-g", help=GRID_HELP)] = None,
    name: Annotated[str | None, typer.Option(help="Sweep name (W&B group); default: run.output_dir's name.")] = None,
    command: Annotated[Literal["train", "iterate"], typer.Option(
        help="What each point runs: mpo train, or every round of mpo iterate.")] = "train",
    launch: Annotated[str | None, typer.Option(help="Run each point as `LAUNCH mpo train|iterate ...`, e.g. "
                                                    "\"accelerate launch --config_file recipes/accelerate/ddp.yaml -m\".")] = None,
    print_commands: Annotated[bool, typer.Option("--print-commands", help="Print each unfinished point's command; run nothing.")] = False,
    report_only: Annotated[bool, typer.Option("--report-only", help="Only rebuild sweep.csv and sweep.png.")] = False,
    tail: Annotated[int, typer.Option(min=1, help="Average the last N logged steps of each point.")] = 5,
):
    """Grid sweep: one `mpo train` (or `mpo iterate`) per point (cartesian product of the --grid values),
    then sweep.csv + sweep.png."""
    sweep = plan(recipe, grid or [], overrides or [], name, command)
    typer.echo(f"sweep {sweep.name}: {len(sweep.points)} point(s) in {sweep.root}", err=print_commands)
    if print_commands:
        for point in sweep.points:
            if not is_finished(point):
                typer.echo(shlex.join(point_command(sweep, point, launch)))
        return
    if not report_only:
        from mpo.cli.sweep_report import evaluate_points

        run_points(sweep, launch)
        if command == "train":  # mpo iterate evaluates its rounds itself
            evaluate_points(sweep)
    report(sweep, tail)


def register(app: typer.Typer) -> None:
    app.command("sweep")(sweep_command)
