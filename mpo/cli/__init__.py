"""The ``mpo`` command. Thin: parse, call into the package, print. Heavy imports live inside the
commands so that ``mpo --help`` stays fast."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mpo.cli_common import guarded

app = typer.Typer(
    help="Mixed Preference Optimization of vision-language policies, driven by a multimodal reward model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main_options(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also the libraries' logs, warnings and "
                                          "weight-loading bars (hidden by default).")] = False,
):
    """Mixed Preference Optimization of vision-language policies, driven by a multimodal reward model."""
    import os

    if not verbose:  # read by transformers / huggingface_hub when they load, inside the commands
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


tiny_app = typer.Typer(help="Build tiny random Qwen2.5-VL models offline (tests, demo, benchmarks).", no_args_is_help=True)
app.add_typer(tiny_app, name="tiny")

data_app = typer.Typer(help="Check a data set before booking GPUs.", no_args_is_help=True)
app.add_typer(data_app, name="data")

from reward.cli import app as reward_app  # noqa: E402  (import-light: no torch at module level)

app.add_typer(reward_app, name="reward")

Overrides = Annotated[list[str] | None, typer.Argument(help="Recipe overrides, e.g. loss.beta=0.2 train.lora.r=8")]
Seed = Annotated[int, typer.Option(help="Random seed; the same seed gives the same bytes.")]
VllmCompatible = Annotated[bool, typer.Option("--vllm-compatible", help="head_dim 64 (vLLM kernels need >= 64).")]
RealVocab = Annotated[bool, typer.Option("--real-vocab", help="Use the real Qwen2.5 vocabulary (151,665 tokens).")]


@tiny_app.command("policy")
@guarded
def tiny_policy(
    out_dir: Path, seed: Seed = 0, vllm_compatible: VllmCompatible = False, real_vocab: RealVocab = False,
    family: Annotated[str, typer.Option(help="qwen2_5_vl, qwen2_vl, qwen3_vl, internvl, llava, gemma3 or glm4v "
                                             "(each with its processor class and its checkpoint's chat template).")]
    = "qwen2_5_vl",
):
    """Build a tiny policy (model + processor) into OUT_DIR: Qwen2.5-VL, or another family."""
    from mpo.cli_common import check_output_folder
    from mpo.errors import MpoError

    check_output_folder(out_dir, "OUT_DIR")

    if family != "qwen2_5_vl":
        from mpo.cli.tiny_families import save_family_policy

        if vllm_compatible or real_vocab:
            raise MpoError("--vllm-compatible / --real-vocab: for --family qwen2_5_vl only")
        path = save_family_policy(out_dir, family, seed)
        typer.echo(f"tiny {family} policy written to {path}")
        return
    from mpo.cli.tiny import save_policy

    path = save_policy(out_dir, seed, vllm_compatible=vllm_compatible, real_vocab=real_vocab)
    typer.echo(f"tiny policy written to {path}")


@tiny_app.command("reward")
@guarded
def tiny_reward(out_dir: Path, seed: Seed = 0, vllm_compatible: VllmCompatible = False, real_vocab: RealVocab = False):
    """Build a tiny reward model (backbone + value_head.safetensors, Skywork layout) into OUT_DIR."""
    from mpo.cli.tiny import save_reward_model
    from mpo.cli_common import check_output_folder

    check_output_folder(out_dir, "OUT_DIR")

    path = save_reward_model(out_dir, seed, vllm_compatible=vllm_compatible, real_vocab=real_vocab)
    typer.echo(f"tiny reward model written to {path}")


@app.command("config")
@guarded
def show_config(
    recipe: Annotated[Path | None, typer.Argument(help="A YAML recipe; omit for the defaults.")] = None,
    overrides: Overrides = None,
):
    """Print a recipe resolved with its overrides (what every command would run with)."""
    from mpo.config import load_recipe, to_yaml

    overrides = list(overrides or [])
    if recipe is not None and "=" in recipe.name and not recipe.exists():  # only overrides were given
        overrides.insert(0, str(recipe))
        recipe = None
    typer.echo(to_yaml(load_recipe(recipe, overrides)), nl=False)


@app.command("train")
@guarded
def train(
    recipe: Annotated[Path, typer.Argument(help="A YAML recipe (model.policy, data.preferences, loss, train).")],
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option("--resume", help="Resume from the last checkpoint in run.output_dir.")] = False,
    round_index: Annotated[int | None, typer.Option("--round", "-r", help="Train round N of an mpo iterate recipe.")] = None,
    stage_only: Annotated[bool, typer.Option("--stage-only", hidden=True, help="Launched by mpo iterate: no manifest.")] = False,
):
    """MPO on a preference set (jsonl, MMPR meta.json, parquet, dataset folder), or on round N's pairs."""
    if round_index is not None:
        from mpo.cli.rounds import train_round

        return train_round(recipe, overrides, round_index, stage_only)
    from mpo.cli_common import check_output_folder
    from mpo.config import load_recipe
    from mpo.models import model_folder
    from mpo.train.run import run_training

    loaded = load_recipe(recipe, overrides or [])
    check_output_folder(loaded.run.output_dir, "run.output_dir")
    for key, value in (("model.policy", loaded.model.policy), ("train.reference_model", loaded.train.reference_model)):
        if value:  # checked before the run folder is touched (a missing policy: run_training says so)
            model_folder(value, key)
    run_training(loaded, resume=resume)


@data_app.command("check")
@guarded
def data_check(
    source: Annotated[Path, typer.Argument(help="A prompt or preference set: .jsonl, .parquet, MMPR meta.json, dataset folder.")],
    recipe: Annotated[Path | None, typer.Argument(help="The recipe it is for (processor, pixel budget, limits).")] = None,
    overrides: Overrides = None,
    kind: Annotated[str | None, typer.Option(help="prompts or preferences (default: from the first row).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the report as JSON here.")] = None,
):
    """Rows, shapes, images and token lengths of a data set; exits 2 if any row is bad. Loads no model."""
    from mpo.cli.data_check import check_data, format_report
    from mpo.cli_common import check_output_file, fail, write_or_recover
    from mpo.config import load_recipe
    from mpo.errors import MpoError
    from mpo.records import write_json

    if kind not in (None, "prompts", "preferences"):
        raise MpoError(f"--kind {kind}: expected prompts or preferences")
    if json_out is not None:
        check_output_file(json_out, "--json", "report.json")
    report = check_data(source, load_recipe(recipe, overrides or []) if recipe else None, kind)
    typer.echo(format_report(report))
    if json_out is not None:
        write_or_recover(json_out, lambda path: write_json(path, report.as_dict()), "the report")
    if report.bad_rows:
        fail(f"{len(report.bad_rows)} bad row(s) in {source} (listed above)")


@app.command("demo")
@guarded
def demo(
    out_dir: Annotated[Path, typer.Option(help="Run folder for the demo.")] = Path("runs/demo"),
    seed: Seed = 0,
    grpo: Annotated[bool, typer.Option("--grpo", help="Then GRPO from the last round's policy, with and without "
                                       "the Selective Sample Buffer (same seed): held-out accuracy and "
                                       "ssb/effective_fraction.")] = False,
):
    """The whole loop on CPU on tiny models it builds itself."""
    from mpo.cli.demo import run_demo
    from mpo.cli_common import check_output_folder

    check_output_folder(out_dir, "--out-dir")

    run_demo(out_dir, seed, grpo=grpo)


from mpo.cli.rounds import register as _register_round_commands  # noqa: E402

_register_round_commands(app)

from mpo.cli.sweep import register as _register_sweep  # noqa: E402  (import-light: typer only)

_register_sweep(app)

from mpo.cli.eval import register as _register_eval  # noqa: E402  (import-light: typer only)

_register_eval(app)

from mpo.cli.grpo import register as _register_grpo  # noqa: E402  (import-light: typer only)

_register_grpo(app)


def main() -> None:  # pragma: no cover - console entry point
    app()
