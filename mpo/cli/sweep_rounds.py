"""What ``mpo sweep --command iterate`` reports: held-out accuracy against rounds, one line per point
(Skywork R1V2's figure for choosing its reward-gap threshold), from each point's own ``mpo iterate`` run.

``sweep.csv`` is in long form, one row per (point, rounds trained), ready for
``pandas.read_csv(...).pivot(index="rounds_trained", columns="point", values="eval/<benchmark>/accuracy")``:

- ``point``, the grid values, ``rank`` (1 = best; see below; empty for a point whose rounds are not
  all finished), ``rounds_trained``: ``0`` is the initial policy (round 0's ``eval_before/``, only with
  ``iterate.eval``), ``k`` the policy that round ``k - 1`` (folder ``round_{k-1:03d}``) trained;
- ``eval/<benchmark>/accuracy`` (with ``iterate.eval``): that policy's held-out accuracy, as the point's
  manifests and ``summary.json`` hold it (:func:`mpo.rounds.report.held_out_points`); empty for a
  round ``iterate.eval.every`` skips;
- :data:`ROUND_METRICS` of the round that trained that policy (empty on row 0): mean rollout reward,
  pairs kept, prompts dropped for a reward gap under ``pairs.min_margin``, the kept pairs' mean reward
  margin (chosen - rejected reward model score), and the round's means of the MPO loss, the implicit
  reward margin and accuracy (β-scaled log-ratio of chosen vs rejected) and δ;
- ``status`` and ``output_dir`` of the point.

Points are ranked by the held-out accuracy of the policy after the **last** round (the recipe's
``iterate.rounds``; ``iterate.eval`` always evaluates it): that is the policy the run delivers, and R1V2's
thresholds differ exactly there (a low threshold peaks and then falls to reward hacking). The best
round's accuracy would reward a peak the run did not keep, and picking a maximum over rounds on the
same held-out set flatters a point; the printed table still shows each point's best round beside its
final one. Ties keep grid order; points without a final accuracy come last, unranked.

``sweep.png``: held-out accuracy against rounds trained, one line per point (with ``iterate.eval``),
then pairs kept and the pairs' mean reward margin per round. Rounds are read from each point's
``round_NNN/manifest.json`` (what ``summary.json`` is made of), so a point stopped part-way shows the
rounds it finished.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROUND_METRICS = ("reward/mean", "pairs/kept", "pairs/dropped/below_margin", "pairs/margin_mean", "train/loss",
                 "train/rewards/margins", "train/rewards/accuracies", "train/delta")


@dataclass
class PointRounds:
    columns: dict  # "point" and the grid values, as sweep.csv writes them
    rounds: list[dict]  # its finished rounds' metrics, in order (summary.json's "rounds")
    status: str
    output_dir: str
    total: int  # the point's iterate.rounds


def finished_rounds(recipe) -> list[dict]:
    """The metrics of the point's finished rounds (their manifests), up to the first unfinished one."""
    from mpo.rounds.layout import RoundLayout

    layout, rows = RoundLayout(recipe), []
    for n in range(recipe.iterate.rounds):
        manifest = layout.manifest(n)
        if manifest is None:
            break
        rows.append(manifest["metrics"])
    return rows


def policy_rows(rounds: list[dict], key: str | None) -> list[dict]:
    """A point's rounds' metrics -> one row per policy: ``rounds_trained`` 0 (the initial policy; with
    ``key`` only), then ``n + 1`` for round ``n``'s trained policy with round ``n``'s metrics."""
    from mpo.rounds.report import held_out_points

    held_out = dict(held_out_points(rounds).get(key, [])) if key else {}
    rows = [{"rounds_trained": 0, key: held_out.get(0, ""), **{m: "" for m in ROUND_METRICS}}] if key else []
    for row in rounds:
        trained = row["round"] + 1
        rows.append({"rounds_trained": trained, **({key: held_out.get(trained, "")} if key else {}),
                     **{m: "" if row.get(m) is None else row[m] for m in ROUND_METRICS}})  # None: no pairs
    return rows


def final_accuracy(point: PointRounds, key: str | None) -> float | None:
    """Held-out accuracy after the point's last round (its ``iterate.rounds``), or None (no
    ``iterate.eval``, or the point has not finished every round)."""
    if key is None or len(point.rounds) < point.total:
        return None
    value = point.rounds[point.total - 1].get(key)
    return value if isinstance(value, (int, float)) else None


def long_table(points: list[PointRounds], key: str | None) -> list[dict]:
    """``sweep.csv``'s rows (module docstring): the points ranked by :func:`final_accuracy`, highest
    first (ties and points without one in grid order, the latter last and unranked), each point's rows
    by ``rounds_trained``."""
    finals = [final_accuracy(p, key) for p in points]
    order = sorted(range(len(points)), key=lambda i: (finals[i] is None, -(finals[i] or 0.0), i))
    table = []
    for rank, i in enumerate(order, 1):
        point = points[i]
        shown = rank if finals[i] is not None else ""
        for row in policy_rows(point.rounds, key):
            table.append({**point.columns, "rank": shown, **row, "status": point.status,
                          "output_dir": point.output_dir})
    return table


def summarize_rounds(sweep) -> list[dict]:
    """The rows of ``sweep`` (a :class:`mpo.cli.sweep.Sweep` of ``mpo iterate`` points): :func:`long_table`
    of every point's finished rounds; a point's status is how this sweep ran it, or with
    ``--report-only`` ``finished`` / ``K/N rounds``."""
    from mpo.cli.sweep_report import accuracy_key, grid_values

    points = []
    for point in sweep.points:
        rounds, total = finished_rounds(point.recipe), point.recipe.iterate.rounds
        status = point.status if point.status != "pending" else (
            "finished" if len(rounds) == total else f"{len(rounds)}/{total} rounds")
        points.append(PointRounds({"point": point.name, **grid_values(point)}, rounds, status, str(point.out_dir),
                                  total))
    return long_table(points, accuracy_key(sweep.points[0].recipe) if sweep.points else None)


def by_point(rows: list[dict]) -> dict[str, list[dict]]:
    """``sweep.csv``'s rows grouped by point, in their (ranked) order."""
    grouped: dict[str, list[dict]] = {}
    for row in rows:
        grouped.setdefault(row["point"], []).append(row)
    return grouped


def accuracy_column(rows: list[dict]) -> str | None:
    return next((k for k in (rows[0] if rows else {}) if k.startswith("eval/")), None)


def format_rounds_table(rows: list[dict]) -> str:
    """One line per point, ranked: held-out accuracy by rounds trained, the final and the best."""
    key = accuracy_column(rows)
    grouped = by_point(rows)
    width = max(len("point"), *(len(name) for name in grouped))
    lines = [f"{'rank':>4}  {'point':<{width}}  " + (f"{'final':>6}  {'best (rounds)':>13}  " if key else "")
             + ("held-out accuracy by rounds trained (0: before)" if key else "pairs kept by round") + "  status"]
    for name, point_rows in grouped.items():
        first = point_rows[0]
        if key:
            done = [(r["rounds_trained"], r[key]) for r in point_rows if r[key] != ""]
            final = point_rows[-1][key] if first["rank"] != "" else ""
            best = max(done, key=lambda pair: pair[1]) if done else None
            curve = " -> ".join(f"{v:.3f}" for _, v in done) or "-"
            summary = (f"{final:>6.3f}  " if final != "" else f"{'-':>6}  ") + (
                f"{f'{best[1]:.3f} ({best[0]})':>13}  " if best else f"{'-':>13}  ")
        else:
            curve = " -> ".join(str(r["pairs/kept"]) for r in point_rows) or "-"
            summary = ""
        lines.append(f"{first['rank']!s:>4}  {name:<{width}}  {summary}{curve}  {first['status']}")
    return "\n".join(lines)


def write_rounds_plot(rows: list[dict], path: Path) -> Path:
    """Held-out accuracy against rounds trained (one line per point; with ``iterate.eval``), pairs kept
    and the pairs' mean reward margin by round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = accuracy_column(rows)
    panels = [*([(key, "held-out accuracy")] if key else []), ("pairs/kept", "pairs kept"),
              ("pairs/margin_mean", "pairs' mean reward margin\n(chosen - rejected)")]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 3.2 * len(panels)), sharex=True, squeeze=False)
    for ax, (column, label) in zip(axes[:, 0], panels):
        for name, point_rows in by_point(rows).items():
            shown = [(r["rounds_trained"], r[column]) for r in point_rows if r[column] != ""]
            ax.plot([x for x, _ in shown], [y for _, y in shown], "o-", label=name)
        ax.set(ylabel=label)
    if key:
        axes[0, 0].set(ylim=(-0.02, 1.02), title=f"Held-out {key.split('/')[1]} accuracy (iterate.eval, greedy)")
    axes[0, 0].legend(fontsize=8, title="ranked by the final round's accuracy" if key else None, title_fontsize=8)
    axes[-1, 0].set(xlabel="rounds trained (0: before training)")
    axes[-1, 0].xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
