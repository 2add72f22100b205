"""``mpo reward ...``: score responses with a reward model, evaluate it on benchmarks, train it.

Import-light on purpose (``mpo --help`` loads this module): torch and transformers are imported
inside the commands. User errors print one red line and exit with status 2 (``mpo.cli_common``).
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from mpo.cli_common import guarded
from mpo.models import VALUE_HEAD_FILE

app = typer.Typer(help="Reward model: score responses, evaluate on benchmarks, train.", no_args_is_help=True)


class Dtype(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class TooLong(str, Enum):
    error = "error"
    skip = "skip"


class Benchmark(str, Enum):
    vl_rewardbench = "vl-rewardbench"
    rewardbench = "rewardbench"
    pairs = "pairs"


Model = Annotated[
    Path, typer.Option("--model", help=f"Reward model folder (backbone + {VALUE_HEAD_FILE}).")
]
BatchTokens = Annotated[
    int, typer.Option("--batch-tokens", min=1, help="Padded tokens per batch (rows x longest).")
]
MaxBatchSize = Annotated[int, typer.Option("--max-batch-size", min=1, help="Rows per batch at most.")]
DtypeOpt = Annotated[Dtype, typer.Option("--dtype", help="auto: bfloat16 on CUDA, float32 on CPU.")]
Device = Annotated[
    str | None, typer.Option("--device", help="cpu, cuda, cuda:1, ... (default: cuda if present).")
]
MinPixels = Annotated[
    int | None, typer.Option("--min-pixels", min=1, help="Per-image pixel floor (processor).")
]
MaxPixels = Annotated[
    int | None, typer.Option("--max-pixels", min=1, help="Per-image pixel cap (processor).")
]
MaxLength = Annotated[
    int | None,
    typer.Option(
        "--max-length",
        min=1,
        help="Tokens per item at most, image tokens included (default: the model's limit).",
    ),
]
OnTooLong = Annotated[
    TooLong,
    typer.Option(
        "--on-too-long", help="error: stop, naming the row; skip: leave such rows out and count them."
    ),
]


class SpecialTokens(str, Enum):
    escape = "escape"
    error = "error"


SpecialTokensOpt = Annotated[
    SpecialTokens,
    typer.Option("--special-tokens", help="Text holding a special token's literal (<|im_end|>, <|image_pad|>): "
                 "escape = tokenized as plain text; error = stop, naming the row."),
]
AllowEmpty = Annotated[bool, typer.Option("--allow-empty", help="Score empty responses instead of failing.")]


def _scorer_options(
    dtype: Dtype, device, batch_tokens, max_batch_size, min_pixels, max_pixels, **more
) -> dict:
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is Dtype.auto:
        dtype = Dtype.bfloat16 if device.startswith("cuda") else Dtype.float32
    return {
        "dtype": dtype.value,
        "device": device,
        "token_budget": batch_tokens,
        "max_batch_size": max_batch_size,
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        **more,
    }


def read_items(path: Path) -> tuple[list[dict], list]:
    """Rows of a scoring input file and their :class:`reward.items.ScoreItem` (``where`` = ``file:line``;
    relative image paths resolved against the file's folder). Rows need ``messages`` and ``response``;
    ``images`` is optional."""
    from mpo.records import Prompt, RecordError, iter_jsonl
    from reward.scorer import ScoreError, ScoreItem

    if not path.is_file():
        raise ScoreError(f"input not found: {path}")
    rows, items = [], []
    for line, row in iter_jsonl(path):
        where = f"{path}:{line}"
        if not isinstance(row, dict):
            raise RecordError(f"{where}: expected a JSON object, got {type(row).__name__}")
        for name in ("messages", "response"):
            if name not in row:
                raise RecordError(f"{where}: missing field {name!r} (rows need messages, images, response)")
        images = row.get("images") or []
        if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            raise RecordError(f"{where}: field 'images': expected a list of paths")
        resolved = [i if Path(i).is_absolute() else str(path.parent / i) for i in images]
        rows.append(row)
        items.append(ScoreItem(Prompt(where, row["messages"], resolved), row["response"], where))
    if not rows:
        raise ScoreError(f"{path}: no rows to score (the file is empty)")
    return rows, items


@app.command("score")
@guarded
def score(
    model: Model,
    input: Annotated[Path, typer.Option("--input", help="JSONL rows with messages, images, response.")],
    output: Annotated[Path, typer.Option("--output", help="JSONL: the same rows plus 'reward'.")],
    batch_tokens: BatchTokens = 8192,
    max_batch_size: MaxBatchSize = 64,
    dtype: DtypeOpt = Dtype.auto,
    device: Device = None,
    min_pixels: MinPixels = None,
    max_pixels: MaxPixels = None,
    max_length: MaxLength = None,
    on_too_long: OnTooLong = TooLong.error,
    allow_empty: AllowEmpty = False,
    special_tokens: SpecialTokensOpt = SpecialTokens.escape,
):
    """Score every row of INPUT and write the rows with their 'reward' to OUTPUT (atomically)."""
    import time

    from mpo.cli_common import check_output_file, write_or_recover
    from mpo.models import model_folder
    from mpo.records import write_jsonl
    from reward.scorer import ScoreOptions, Scorer

    folder = model_folder(model, "--model", reward=True)  # checked once: the scorer finds it checked
    check_output_file(output, "--output", "scores.jsonl")
    rows, items = read_items(input)
    options = _scorer_options(
        dtype,
        device,
        batch_tokens,
        max_batch_size,
        min_pixels,
        max_pixels,
        max_length=max_length,
        on_too_long=on_too_long.value,
        allow_empty=allow_empty,
        special_tokens=special_tokens.value,
    )
    scorer = Scorer(folder, ScoreOptions(**options))
    start = time.perf_counter()
    result = scorer.score_all(items)
    seconds = time.perf_counter() - start
    scored = [{**row, "reward": value} for row, value in zip(rows, result.scores) if value is not None]
    write_or_recover(output, lambda path: write_jsonl(path, scored), f"{len(scored)} scored row(s)")
    if result.skipped:
        typer.secho(
            f"skipped {len(result.skipped)} of {len(rows)} rows longer than max_length "
            f"{scorer.limit} tokens (left out of {output}):",
            fg=typer.colors.YELLOW,
            err=True,
        )
        for skip in result.skipped[:10]:
            typer.secho(f"  {skip.where}: {skip.num_tokens} tokens", fg=typer.colors.YELLOW, err=True)
        if len(result.skipped) > 10:
            typer.secho(f"  ... and {len(result.skipped) - 10} more", fg=typer.colors.YELLOW, err=True)
    typer.echo(
        f"scored {len(scored)} rows -> {output} ({options['dtype']} on {options['device']}, "
        f"{len(scored) / max(seconds, 1e-9):.1f} rows/s)"
    )


@app.command("eval")
@guarded
def evaluate(
    model: Model,
    benchmark: Annotated[Benchmark, typer.Option("--benchmark", help="Which scoring rules to apply.")],
    data: Annotated[Path, typer.Option("--data", help="Benchmark file (.jsonl or .parquet).")],
    image_root: Annotated[
        Path | None,
        typer.Option(
            "--image-root", help="Folder relative image paths start from (default: the data file's)."
        ),
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", help="Write the results as JSON here.")] = None,
    batch_tokens: BatchTokens = 8192,
    max_batch_size: MaxBatchSize = 64,
    dtype: DtypeOpt = Dtype.auto,
    device: Device = None,
    min_pixels: MinPixels = None,
    max_pixels: MaxPixels = None,
    max_length: MaxLength = None,
    on_too_long: Annotated[
        TooLong,
        typer.Option(
            "--on-too-long",
            help="error: stop, naming the row; skip: leave such rows unscored, count them as wrong and list them.",
        ),
    ] = TooLong.error,
    special_tokens: SpecialTokensOpt = SpecialTokens.escape,
):
    """Evaluate a reward model on VL-RewardBench, RewardBench or a file of preference pairs."""
    from mpo.cli_common import check_output_file, write_or_recover
    from mpo.models import model_folder
    from mpo.records import write_json
    from reward.benchmarks import format_table
    from reward.evaluate import evaluate_model

    model_folder(model, "--model", reward=True)
    if output is not None:
        check_output_file(output, "--output", "results.json")
    options = _scorer_options(
        dtype, device, batch_tokens, max_batch_size, min_pixels, max_pixels, max_length=max_length,
        on_too_long=on_too_long.value, special_tokens=special_tokens.value,
    )
    results = evaluate_model(model, benchmark.value, data, image_root=image_root, **options)
    typer.echo(format_table(results))
    skipped = results["scoring"]["skipped_too_long"]
    if skipped:
        typer.secho(f"{len(skipped)} response(s) longer than the limit were not scored; their rows count as "
                    f"wrong. First: {skipped[0]}", fg=typer.colors.YELLOW, err=True)
    if output is not None:
        write_or_recover(output, lambda path: write_json(path, results), "the results")
        typer.echo(f"results written to {output}")


@app.command("train")
@guarded
def train(
    recipe: Annotated[Path, typer.Argument(help="A YAML recipe with a reward_train section.")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Recipe overrides, e.g. reward_train.max_steps=10")
    ] = None,
):
    """Train a reward model with the Bradley-Terry loss, phase by phase (Skywork-VL Reward recipe)."""
    from mpo.cli_common import check_output_folder
    from mpo.config import load_recipe
    from mpo.models import model_folder
    from reward.train import format_summary, run_phases

    resolved = load_recipe(recipe, overrides or [])
    check_output_folder(resolved.run.output_dir, "run.output_dir")
    if resolved.reward_train.init_from:  # checked before the run folder is touched
        model_folder(resolved.reward_train.init_from, "reward_train.init_from", reward_backbone=True)
    summaries = run_phases(resolved)
    typer.echo(format_summary(summaries))
    typer.echo(f"final reward model: {Path(resolved.run.output_dir) / 'final'}")
