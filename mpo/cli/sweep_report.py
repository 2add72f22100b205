"""What ``mpo sweep`` reports (:func:`mpo.cli.sweep.report`): ``sweep.csv``, ``sweep.png``, the
table, and the held-out accuracy they carry.

With ``iterate.eval`` in the recipe, each
trained point's ``policy/`` is evaluated as ``mpo iterate`` evaluates a round's policy
(:func:`mpo.rounds.evaluate.run_eval`: greedy, ``iterate.eval``'s data, benchmark and ``max_tokens``;
``every`` does not apply) into the point's ``eval/`` folder; ``sweep.csv``, ``sweep.png`` and the
table carry its accuracy and rank the points by it, highest first.

A finished eval is read back without loading a model, so rerunning the sweep redoes nothing; one
killed part-way resumes its chunks.
"""

from __future__ import annotations

import gc
from pathlib import Path

from mpo.rounds.layout import EVAL_DIR as EVAL_FOLDER  # a point's held-out eval: <point>/eval/


def accuracy_key(recipe) -> str | None:
    """The column of the held-out accuracy (``eval/<benchmark>/accuracy``), or None without ``iterate.eval``."""
    settings = recipe.iterate.eval
    return None if settings is None else f"eval/{settings.benchmark}/accuracy"


def evaluate_points(sweep) -> None:
    """Evaluate every trained point (``policy/`` saved, :func:`mpo.keys.finished`) of a sweep whose
    recipe has ``iterate.eval``; the problems are read once."""
    from mpo.keys import finished
    from mpo.rounds.evaluate import LazyBackend, load_eval_problems, run_eval

    settings = sweep.points[0].recipe.iterate.eval if sweep.points else None
    if settings is None:
        return
    problems = load_eval_problems(settings.benchmark, settings.data, settings.split,
                                  image_cache=sweep.root / "image_cache")
    for point in sweep.points:
        if not finished(point.out_dir):
            print(f"{point.name}: not trained; no held-out eval")
            continue
        recipe = point.recipe
        with LazyBackend(recipe.rollout, recipe.model, point.out_dir / "policy") as backend:
            metrics = run_eval(problems, backend, point.out_dir / EVAL_FOLDER, settings.benchmark,
                               max_tokens=settings.max_tokens, chunk_size=recipe.iterate.rollout_chunk)
        print(f"{point.name}: held-out {settings.benchmark} accuracy {metrics[accuracy_key(recipe)]:.1%}")
        _free_memory()


def held_out_accuracy(point) -> float | str:
    """The point's finished held-out accuracy, else ``""`` (as ``sweep.csv`` writes a missing value)."""
    from mpo.rounds.evaluate import finished_metrics

    settings = point.recipe.iterate.eval
    done = finished_metrics(Path(point.out_dir) / EVAL_FOLDER, settings.benchmark) if settings else None
    return "" if done is None else done[accuracy_key(point.recipe)]


def grid_values(point) -> dict[str, str]:
    """The point's grid values as ``sweep.csv`` writes them (lists and mappings as JSON)."""
    import json

    return {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in point.values.items()}


def ranked(rows: list[dict], key: str | None) -> list[dict]:
    """``rows`` by held-out accuracy, highest first, points without one last (grid order otherwise kept)."""
    if key is None or all(row[key] == "" for row in rows):
        return rows
    return sorted(rows, key=lambda row: -row[key] if row[key] != "" else float("inf"))


def _free_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write_csv(rows: list[dict], path: Path) -> Path:
    import csv
    import io

    from mpo.records import atomic_write_text

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())
    return path


def write_plot(rows: list[dict], path: Path, tail: int) -> Path:
    """Bars per point: reward margin, reward accuracy, and the three loss parts side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["point"] for r in rows]
    x = list(range(len(rows)))

    def values(key):
        return [r[key] if r[key] != "" else float("nan") for r in rows]

    held_out = [k for k in rows[0] if k.startswith("eval/")]  # iterate.eval's accuracy (sweep_eval)
    fig, axes = plt.subplots(3 + len(held_out), 1, figsize=(max(6.0, 0.9 * len(rows) + 2), 9 + 3 * len(held_out)),
                             sharex=True)
    for ax, key in zip(axes[3:], held_out):
        ax.bar(x, values(key), color="tab:purple")
        ax.set(ylabel=f"held-out accuracy\n({key.split('/')[1]})", ylim=(0, 1.05))
    axes[0].bar(x, values("rewards/margins"), color="tab:blue")
    axes[0].axhline(0, color="gray", linewidth=0.8)
    axes[0].set(ylabel="reward margin", title=f"Sweep: mean over each point's last <= {tail} logged steps")
    axes[1].bar(x, values("rewards/accuracies"), color="tab:green")
    axes[1].set(ylabel="reward accuracy", ylim=(0, 1.05))
    width = 0.27
    for offset, (key, label) in zip((-width, 0, width), (("loss/preference", "preference (DPO)"),
                                                         ("loss/quality", "quality (BCO)"),
                                                         ("loss/generation", "generation (SFT)"))):
        axes[2].bar([i + offset for i in x], values(key), width, label=label)
    axes[2].set(ylabel="loss part (unweighted)")
    axes[2].legend(fontsize=8, ncols=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    axes[2].set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_table(rows: list[dict]) -> str:
    def num(value, fmt):
        return format(value, fmt) if value != "" else "-"

    width = max(len("point"), *(len(r["point"]) for r in rows))
    held_out = [k for k in rows[0] if k.startswith("eval/")]  # ranked by it (sweep_eval.ranked)
    lines = [f"{'point':<{width}}  " + "".join(f"{'held-out':>8}  " for _ in held_out)
             + f"{'margin':>9}  {'accuracy':>8}  {'loss':>8}  {'delta':>8}  status"]
    for r in rows:
        lines.append(f"{r['point']:<{width}}  " + "".join(f"{num(r[k], '8.3f')}  " for k in held_out)
                     + f"{num(r['rewards/margins'], '+9.4f')}  "
                     f"{num(r['rewards/accuracies'], '8.3f')}  {num(r['loss'], '8.4f')}  "
                     f"{num(r['delta'], '+8.4f')}  {r['status']}")
    return "\n".join(lines)
