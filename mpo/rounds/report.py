"""What a run of ``mpo iterate`` shows: a per-round table, ``summary.json``, ``plots/*.png`` and,
with ``run.report_to: wandb``, one W&B run with round-indexed metrics and a table of sample rollouts
(their images, scores and chosen/rejected marks).

The W&B run id is kept in ``wandb_id.txt`` in the run folder, so a resumed run logs into the same
W&B run. Round metrics are logged against the ``round`` step metric, so the trainer's own per-step
logging (through transformers' W&B callback, into the same run) does not clash with them.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from mpo.records import PreferencePair, ScoredRollout, atomic_write_text, read_jsonl, write_json
from mpo.rounds.layout import PAIRS_FILE, SCORED_FILE

TABLE_COLUMNS = [
    ("round", "{:>5}"), ("reward/mean", "{:>11.3f}"), ("reward/p50", "{:>10.3f}"), ("pairs/kept", "{:>10}"),
    ("pairs/margin_mean", "{:>12.3f}"), ("train/loss", "{:>10.4f}"), ("train/delta", "{:>9.4f}"),
]
SAMPLE_PROMPTS = 4  # prompts per round shown in the W&B rollout table
PLOTS = ("reward_by_round", "pair_margins", "loss_parts", "delta")
HELD_OUT_PLOT = "held_out_accuracy"  # with iterate.eval: held-out accuracy against rounds trained
BEFORE = "eval_before/"  # round 0's metrics of the initial policy's held-out eval (``eval/`` otherwise)
MONITOR_BEFORE = "monitor_before/"  # round 0's of its iterate.monitors (``monitor/`` otherwise)
GRPO_PLOT = "grpo_progress"  # iterate.then: grpo: reward per GRPO step, held-out and monitor accuracy beside it


def _before(key: str) -> str | None:
    """The after-training name of a round-0 metric of the initial policy (``eval_before/...``,
    ``monitor_before/...``), or None."""
    for prefix, name in ((BEFORE, "eval/"), (MONITOR_BEFORE, "monitor/")):
        if key.startswith(prefix):
            return name + key.removeprefix(prefix)
    return None


def held_out_points(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """``{"eval/<benchmark>/accuracy": [(rounds trained, accuracy), ...]}`` of ``iterate.eval`` (and
    ``monitor/<name>/accuracy`` of ``iterate.monitors``): 0 is the initial policy (round 0's
    ``eval_before/...``), ``n + 1`` round ``n``'s trained policy."""
    points: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in row.items():
            if not key.endswith("/accuracy"):
                continue
            if after := _before(key):
                points.setdefault(after, []).insert(0, (row["round"], value))
            elif key.startswith(("eval/", "monitor/")):
                points.setdefault(key, []).append((row["round"] + 1, value))
    return points


def plot_names(rows: list[dict], grpo: dict | None = None) -> list[str]:
    """The run's plots: :data:`PLOTS`, :data:`HELD_OUT_PLOT` with ``iterate.eval`` and :data:`GRPO_PLOT`
    with ``iterate.then: grpo``."""
    return [*PLOTS, *([HELD_OUT_PLOT] if held_out_points(rows) else []), *([GRPO_PLOT] if grpo else [])]


def format_round_table(rows: list[dict]) -> str:
    """One line per round; ``eval/*`` metrics (the demo's colour accuracy, ``iterate.eval``'s held-out
    accuracy; per-category ones are in ``summary.json``) get columns too. With ``iterate.eval`` a first
    row ``before`` holds the initial policy's held-out accuracy (round 0's ``eval_before/...``)."""
    extra = sorted({k for row in rows for k in row
                    if k.startswith("eval/") and (k.count("/") == 1 or k.endswith("/accuracy"))})
    extra += sorted({k for row in rows for k in row if k.startswith("monitor/") and k.endswith("/accuracy")})
    before = {after: v for k, v in (rows[0] if rows else {}).items() if (after := _before(k))}
    rows = [{"round": "before", **before}, *rows] if before else rows
    columns = list(TABLE_COLUMNS) + [(name, "{:>14.3f}") for name in extra]
    widths = [max(len(name), 9) for name, _ in columns]
    lines = ["  ".join(f"{name:>{w}}" for (name, _), w in zip(columns, widths))]
    for row in rows:
        cells = []
        for (name, fmt), w in zip(columns, widths):
            value = row.get(name)
            text = fmt.format(value).strip() if isinstance(value, (int, float)) else str(value or "-")
            cells.append(f"{text:>{w}}")
        lines.append("  ".join(cells))
    return "\n".join(lines)


class RunReport:
    """The run's report. W&B opens at :meth:`start` (before the first round that does work, so the
    trainer logs into the same run); a finished run read back opens nothing and rewrites nothing."""

    def __init__(self, recipe, run_dir: Path):
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.wandb = None

    def start(self) -> None:
        if self.recipe.run.report_to == "wandb" and self.wandb is None:
            self.wandb = _start_wandb(self.recipe, self.run_dir)

    def round_done(self, manifest: dict, scored_path: Path, prompts) -> None:
        metrics = manifest["metrics"]
        if self.wandb is None:
            return
        self.wandb.log({f"round/{k}" if k != "round" else "round": v for k, v in metrics.items()
                        if isinstance(v, (int, float))})
        self.wandb.log({"round": metrics["round"], "round/rollouts": _rollout_table(self.wandb, scored_path, prompts)})

    def finish(self, manifests: list[dict], grpo: dict | None = None) -> Path:
        """``summary.json`` (``rounds``; ``grpo``: the GRPO stage's entry with ``iterate.then: grpo``),
        the plots and the table (the GRPO stage its last row)."""
        rows = [m["metrics"] for m in manifests]
        path = self.run_dir / "summary.json"
        summary = json.loads(json.dumps({"rounds": rows, **({"grpo": grpo} if grpo else {})}))
        same = path.is_file() and json.loads(path.read_text(encoding="utf-8")) == summary
        if not same:
            write_json(path, summary)
        plots = [self.run_dir / "plots" / f"{name}.png" for name in plot_names(rows, grpo)]
        if not same or not all(plot.is_file() for plot in plots):
            plots = write_plots(self.run_dir, rows, grpo)
        print(format_round_table(rows + ([{"round": "grpo", **grpo}] if grpo else [])))
        if grpo:
            print(f"GRPO stage: {grpo['output_dir']} (policy: {grpo['policy_out']})")
        print(f"summary: {self.run_dir / 'summary.json'}; plots: {', '.join(str(p) for p in plots)}")
        if self.wandb is not None:
            for plot in plots:
                self.wandb.log({f"plots/{plot.stem}": self.wandb.Image(str(plot))})
            self.wandb.finish()
            self.wandb.teardown()  # wandb keeps per-process settings (its folder) until torn down
        return self.run_dir / "summary.json"


def _start_wandb(recipe, run_dir: Path):
    import wandb

    id_file = run_dir / "wandb_id.txt"
    if not id_file.exists():
        atomic_write_text(id_file, uuid.uuid4().hex[:12])
    run_id = id_file.read_text().strip()
    wandb.init(project=recipe.run.wandb_project, group=recipe.run.wandb_group, name=run_dir.name, id=run_id,
               resume="allow", dir=str(run_dir), config=recipe.model_dump(mode="json"))
    wandb.define_metric("round")
    wandb.define_metric("round/*", step_metric="round")
    return wandb


def _rollout_table(wandb, scored_path: Path, prompts):
    """Sample rollouts of the first prompts: image, prompt, response, reward, chosen/rejected mark."""
    pairs_path = scored_path.with_name(PAIRS_FILE)
    pairs = read_jsonl(pairs_path, PreferencePair) if pairs_path.exists() else []
    chosen = {(p.prompt_id, p.chosen) for p in pairs}
    rejected = {(p.prompt_id, p.rejected) for p in pairs}
    shown = {p.prompt_id: p for p in prompts[:SAMPLE_PROMPTS]}
    table = wandb.Table(columns=["prompt_id", "image", "prompt", "response", "reward", "mark"])
    for s in read_jsonl(scored_path, ScoredRollout):
        prompt = shown.get(s.prompt_id)
        if prompt is None:
            continue
        image = wandb.Image(prompt.images[0]) if prompt.images else None
        text = " ".join(part.get("text", "") for m in prompt.messages if isinstance(m.get("content"), list)
                        for part in m["content"])
        mark = "chosen" if (s.prompt_id, s.response) in chosen else (
            "rejected" if (s.prompt_id, s.response) in rejected else "")
        table.add_data(s.prompt_id, image, text, s.response, s.reward, mark)
    return table


def write_plots(run_dir: Path, rows: list[dict], grpo: dict | None = None) -> list[Path]:
    """Reward distribution by round, pair margins, loss parts and δ, as PNGs under ``plots/``; with
    ``iterate.eval`` held-out accuracy (the GRPO stage's, ``grpo``, as a last point); with ``grpo`` its
    progress (:func:`progress_panel`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    rounds = [r["round"] for r in rows]
    written = []

    def save(fig, name):
        path = out / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(6, 4))
    rewards = [[s.reward for s in read_jsonl(run_dir / f"round_{n:03d}" / SCORED_FILE, ScoredRollout)]
               for n in rounds]
    ax.boxplot(rewards, positions=rounds)
    ax.plot(rounds, [r["reward/mean"] for r in rows], "o-", label="mean")
    ax.set(xlabel="round", ylabel="reward", title="Rollout reward by round")
    ax.legend()
    save(fig, "reward_by_round")

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rounds, [r.get("pairs/margin_mean") or 0.0 for r in rows], "o-", label="mean reward margin")
    ax2 = ax.twinx()
    ax2.bar(rounds, [r["pairs/kept"] for r in rows], alpha=0.3, color="gray", label="pairs kept")
    ax.set(xlabel="round", ylabel="chosen - rejected reward", title="Pairs")
    ax2.set_ylabel("pairs kept")
    save(fig, "pair_margins")

    parts = [k for k in ("train/loss/preference", "train/loss/quality", "train/loss/generation", "train/loss")
             if any(k in r for r in rows)]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in parts:
        ax.plot(rounds, [r.get(key, float("nan")) for r in rows], "o-", label=key.removeprefix("train/"))
    ax.set(xlabel="round", ylabel="mean loss in round", title="MPO loss parts")
    if parts:
        ax.legend()
    save(fig, "loss_parts")

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rounds, [r.get("train/delta_final", float("nan")) for r in rows], "o-")
    ax.set(xlabel="round", ylabel="δ at end of round", title="BCO shift δ")
    save(fig, "delta")

    more = [(HELD_OUT_PLOT, _held_out_panel)] if held_out_points(rows) else []
    for name, panel in more + ([(GRPO_PLOT, progress_panel)] if grpo else []):
        fig, ax = plt.subplots(figsize=(6, 4))
        panel(ax, rows, grpo)
        save(fig, name)
    return written


def _curve_label(key: str) -> str:
    """An accuracy curve's legend: the benchmark of ``eval/<benchmark>/accuracy``, ``monitor <name>``."""
    return key.split("/")[1] if key.startswith("eval/") else f"monitor {key.split('/')[1]}"


def _held_out_panel(ax, rows: list[dict], grpo: dict | None = None) -> None:
    """``iterate.eval``'s accuracy against rounds trained (:func:`held_out_points`); the GRPO stage's
    (``iterate.then: grpo``) one step further, marked."""
    for key, points in held_out_points(rows).items():
        line, = ax.plot([x for x, _ in points], [y for _, y in points], "o-", label=_curve_label(key))
        if grpo and key in grpo:
            x, y = len(rows) + 1, grpo[key]
            ax.plot([points[-1][0], x], [points[-1][1], y], "--", color=line.get_color())
            ax.plot([x], [y], "*", markersize=12, color=line.get_color())
            ax.annotate("GRPO", (x, y), textcoords="offset points", xytext=(4, 6))
    ax.set(xlabel="rounds trained (0: before training)", ylabel="held-out accuracy", ylim=(-0.02, 1.02),
           title="Held-out accuracy (iterate.eval, greedy)")
    ax.legend()


def progress_panel(ax, rows: list[dict], grpo: dict) -> None:
    """The GRPO stage against its steps: the reward (``metrics.jsonl``'s ``reward``, left axis) and, on
    the right axis, each held-out and monitor accuracy: step 0 the last round's eval (GRPO's starting
    policy), then ``grpo["step_evals"]`` and the final policy's at ``grpo["final_step"]``."""
    from mpo.train.setup import METRICS_FILE, read_metrics

    logged = [row for row in read_metrics(Path(grpo["output_dir"]) / METRICS_FILE) if "reward" in row]
    ax.plot([row["step"] for row in logged], [row["reward"] for row in logged], "-", color="gray", label="reward")
    ax.set(xlabel="GRPO step", ylabel="reward (mean of the step's completions)",
           title="GRPO: reward, held-out and monitor accuracy")
    right = ax.twinx()
    start = rows[-1] if rows else {}
    points = [{"step": 0, **start}, *grpo.get("step_evals", []), {"step": grpo.get("final_step"), **grpo}]
    keys = sorted({k for p in points for k in p if k.startswith(("eval/", "monitor/")) and k.endswith("/accuracy")})
    for key in keys:
        shown = [(p["step"], p[key]) for p in points if key in p and p["step"] is not None]
        right.plot([x for x, _ in shown], [y for _, y in shown], "o-", label=_curve_label(key))
    right.set(ylabel="accuracy (greedy)", ylim=(-0.02, 1.02))
    lines = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="best")


def load_summary(run_dir: Path) -> list[dict]:
    return json.loads((Path(run_dir) / "summary.json").read_text(encoding="utf-8"))["rounds"]
