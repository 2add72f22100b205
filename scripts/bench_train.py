"""Benchmark one MPO training step: ours (mpo.train.trainer) against TRL 1.16's DPOTrainer doing MPO.

    python scripts/bench_train.py                   # CPU, tiny Qwen2.5-VL, 1 thread, table + JSON
    python scripts/bench_train.py --gpu --size 3b   # CUDA, random Qwen2.5-VL-3B-shaped model, bf16

Every side trains the same model (same folder), on the same image pairs, with the same batch size,
pixel budget, optimizer and schedule; each side runs in its own subprocess (so peak memory is its
own) with ``torch.set_num_threads(1)``. Sides: ``trl`` (DPOTrainer, ``loss_type=["sigmoid",
"bco_pair","sft"]``, live reference as TRL requires for vision data), ``unshared`` (today's path,
``train.share_prompt=false``: rows prompt+chosen and prompt+rejected, one vision encode per pair,
reference log-probs precomputed once before training), ``shared`` (the default,
``train.share_prompt=true``: one packed row per pair, :mod:`mpo.train.shared_prefix`), and on request
``unshared-live`` / ``shared-live`` (a live frozen reference copy, like TRL).

Pair sets (``--sets``), each one batch of ``--batch`` pairs on 448x448 images (256 visual tokens
each, the ``--gpu`` pixel budget on CPU too): ``long-prompt`` (answers of ``--short-words`` words: the
prompt is nearly all of each row) and ``long-answer`` (answers of ``--words`` words); ``colour``
is the bundled colour pairs at the tiny pixel budget (4-64 visual tokens). For each set the script
also prints the model FLOPs per step of each path from the same token counts
(``bench_models.path_flops``), for the benchmarked model and for the Qwen2.5-VL-3B/7B shapes.

What is measured:
- step time: wall time between consecutive optimizer-step ends (``on_step_end``), so it includes data
  loading/collation, forward/backward, the optimizer and per-step metric bookkeeping; the first
  ``--warmup`` steps are dropped; median (and p10/p90) reported. Also the training thread's CPU time
  per step (``time.thread_time``; with one torch thread and no loader workers all of a step's work
  runs there), which is far less disturbed by other processes on a busy machine than wall time.
  The whole set is one batch, so every step sees the same tokens. Each side runs ``--repeats``
  times in fresh processes, interleaved; the medians over runs are reported. Our one-off reference
  pass (and the length check that encodes every pair once) is reported separately in ``setup_s``.
- memory, CPU: peak resident set size (RSS, sampled every 2 ms from /proc/self/statm) during
  ``trainer.train()`` minus the RSS just before it (activations, gradients, optimizer state,
  allocator growth), plus the process's lifetime peak (``ru_maxrss``, which also counts imports and
  the models loaded at setup, e.g. TRL's reference copy). GPU: ``torch.cuda.max_memory_allocated``.
- ``--gpu``: tokens/s (non-pad tokens of the chosen and rejected sequences per second) and model
  FLOPs utilisation = (6·N_lm·tokens + 6·N_vision·patches, the vision tower counted once per pair,
  no attention-score FLOPs, no recompute) / step time / the GPU's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench_models import (  # noqa: E402  (scripts/, beside this file)
    SHAPES,
    parameter_counts,
    path_flops,
    qwen_vl_config,
    random_backbone,
    synthetic_pairs,
    tokens_and_flops,
)

PAIRS = REPO / "tests" / "fixtures" / "pairs" / "colour_pairs.jsonl"
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}
# side -> (live reference, share_prompt); "trl" is TRL's DPOTrainer
OURS = {"unshared": (False, False), "shared": (False, True), "unshared-live": (True, False), "shared-live": (True, True)}
BIG_PIXELS = (256 * 28 * 28, 1280 * 28 * 28)  # a 448x448 image -> 256 visual tokens
TINY_PIXELS = (3136, 50176)


class RssPeak:
    """Peak RSS (bytes) above a baseline, sampled in a background thread."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.baseline = self.rss()

    def rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self.page

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.baseline = self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.ends, self.cpu = [], []

        def on_train_begin(self, args, state, control, **kwargs):
            self.on_step_end(args, state, control)

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())
            self.cpu.append(time.thread_time())  # the training thread's CPU time (1 torch thread, 0 workers)

    return StepTimer()


def trl_trainer(policy, pairs_file, args):
    import torch
    from datasets import Dataset
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import DPOConfig, DPOTrainer

    rows = []
    for r in map(json.loads, Path(pairs_file).read_text().splitlines()):
        turn = lambda text: [{"role": "assistant", "content": [{"type": "text", "text": text}]}]
        rows.append(
            {
                "prompt": r["messages"],
                "chosen": turn(r["chosen"]),
                "rejected": turn(r["rejected"]),
                "images": [Image.open(p).convert("RGB") for p in r["images"]],
            }
        )
    config = DPOConfig(
        output_dir=args.work + "/trl",
        per_device_train_batch_size=args.batch,
        max_steps=args.warmup + args.steps,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        logging_steps=1,
        report_to="none",
        bf16=args.gpu,
        gradient_checkpointing=args.gpu,
        max_length=None,
        save_strategy="no",
        disable_tqdm=True,
        loss_type=["sigmoid", "bco_pair", "sft"],
        loss_weights=[0.8, 0.2, 1.0],
        beta=0.1,
        use_cpu=not torch.cuda.is_available(),
    )
    dtype = "bfloat16" if args.gpu else "float32"
    model = AutoModelForImageTextToText.from_pretrained(policy, dtype=dtype)
    if args.freeze_vision:  # what train.freeze=[vision] freezes: the vision tower but its merger
        from mpo.train.run import freeze_parts

        freeze_parts(model, ["vision"])
    return DPOTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        # the same pixel budget as ours (the saved processor's own budget may be smaller)
        processing_class=AutoProcessor.from_pretrained(
            policy, size={"shortest_edge": args.min_pixels, "longest_edge": args.max_pixels}
        ),
    )


def our_trainer(policy, pairs_file, args, live: bool, share: bool):
    from mpo.config import load_recipe
    from mpo.data import load_preferences
    from mpo.train.run import build_trainer, load_policy, precompute_reference

    recipe = load_recipe(
        None,
        [
            f"model.policy={policy}",
            f"data.preferences={pairs_file}",
            f"run.output_dir={args.work}/ours-{live}-{share}",
            f"model.dtype={'bfloat16' if args.gpu else 'float32'}",
            f"model.min_pixels={args.min_pixels}",
            f"model.max_pixels={args.max_pixels}",
            "loss.bco_delta=none",
            "loss.sft_reduction=token",
            f"train.per_device_batch_size={args.batch}",
            f"train.max_steps={args.warmup + args.steps}",
            "train.learning_rate=1e-5",
            "train.lr_scheduler=constant",
            "train.weight_decay=0.0",
            "train.max_length=100000",
            f"train.gradient_checkpointing={args.gpu}",
            f"train.reference_logps={'live' if live else 'precomputed'}",
            f"train.share_prompt={share}",
            "train.save_steps=100000",
            f"train.freeze={'[vision]' if args.freeze_vision else '[]'}",
        ],
    )
    model, processor = load_policy(recipe)
    loaded = load_preferences(pairs_file)
    trainer, dataset = build_trainer(recipe, loaded.records, None, model, processor)
    precompute_reference(trainer, dataset, recipe)
    return trainer, dataset


def run_side(side: str, args) -> dict:
    """One side in this process: build, train, return measurements as a dict."""
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    if side == "trl":
        trainer = trl_trainer(args.policy, args.pairs_file, args)
    else:
        trainer, _ = our_trainer(args.policy, args.pairs_file, args, *OURS[side])
    setup = time.perf_counter() - start
    timer = step_timer()
    trainer.add_callback(timer)
    cuda = args.gpu and torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with RssPeak() as rss:
        trainer.train()
    steps = [b - a for a, b in zip(timer.ends, timer.ends[1:])][args.warmup :]
    cpu = [b - a for a, b in zip(timer.cpu, timer.cpu[1:])][args.warmup :]
    quantiles = statistics.quantiles(steps, n=10) if len(steps) > 1 else steps * 9
    result = {
        "side": side,
        "setup_s": setup,
        "median_step_s": statistics.median(steps),
        "p10_step_s": quantiles[0],
        "p90_step_s": quantiles[-1],
        "median_step_cpu_s": statistics.median(cpu),
        "steps_timed": len(steps),
        "peak_rss_delta_mb": (rss.peak - rss.baseline) / 2**20,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if cuda:
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def bench_pairs(work: Path, count: int) -> Path:
    rows = [json.loads(line) for line in PAIRS.read_text().splitlines()]
    rows = [r for r in rows if r["images"]][:count]
    for r in rows:
        r["images"] = [str((PAIRS.parent / p).resolve()) for p in r["images"]]
    path = work / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def gpu_policy(work: Path, size: str) -> Path:
    """A random Qwen2.5-VL model of a published shape (bf16, real Qwen2.5 vocabulary), saved to disk."""
    import torch

    from mpo.cli.tiny import build_processor

    model, tokenizer = random_backbone(size, "cuda" if torch.cuda.is_available() else "cpu")
    out = work / f"policy-{size}"
    model.save_pretrained(out)
    build_processor(tokenizer).save_pretrained(out)
    return out


def spawn(side: str, args) -> dict:
    command = [
        sys.executable,
        __file__,
        "--side",
        side,
        "--policy",
        str(args.policy),
        "--pairs-file",
        str(args.pairs_file),
        "--work",
        args.work,
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--min-pixels",
        str(args.min_pixels),
        "--max-pixels",
        str(args.max_pixels),
    ] + (["--freeze-vision"] if args.freeze_vision else []) + (["--gpu"] if args.gpu else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    done = subprocess.run(command, check=False, capture_output=True, text=True, env=env, cwd=REPO)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"side {side} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def aggregate(runs: list[dict]) -> dict:
    """Median over repeated runs of one side (each run its own process)."""
    out = dict(runs[0])
    for key in (
        "setup_s",
        "median_step_s",
        "p10_step_s",
        "p90_step_s",
        "median_step_cpu_s",
        "peak_rss_delta_mb",
        "max_rss_mb",
        "peak_cuda_mb",
    ):
        if key in out:
            out[key] = statistics.median(r[key] for r in runs)
    out.update(runs=len(runs), median_step_s_each_run=[r["median_step_s"] for r in runs])
    return out


BASES = (("trl", 5), ("today", 6))  # ratio columns: against TRL and against today's unshared path


def _ratio(value: float, base: float) -> float:
    return value / base if base > 0 else float("nan")


def report(name: str, results: dict, extra: dict, args) -> dict:
    """One set's table (each side against TRL and against today's unshared path) and summary."""
    trl, today = results.get("trl"), results.get("unshared")
    mem = "peak_cuda_mb" if "peak_cuda_mb" in next(iter(results.values())) else "peak_rss_delta_mb"
    paths = extra["paths"]
    rows = []
    for r in results.values():
        path = paths["trl" if r["side"] == "trl" else r["side"].removesuffix("-live")]
        for label, base in (("trl", trl), ("today", today)):
            if base is not None:
                r[f"step_ratio_vs_{label}"] = _ratio(r["median_step_s"], base["median_step_s"])
                r[f"cpu_step_ratio_vs_{label}"] = _ratio(r["median_step_cpu_s"], base["median_step_cpu_s"])
                r[f"memory_ratio_vs_{label}"] = _ratio(r[mem], base[mem])
        r["lm_tokens_per_step"] = path["lm_tokens"]
        r["model_flops_per_step"] = path["flops_per_step"]
        if args.gpu:  # tokens of the unshared rows (the same work for every side) per second
            r["tokens_per_s"] = extra["tokens_per_step"] / r["median_step_s"]
            r["mfu"] = path["flops_per_step"] / r["median_step_s"] / extra["peak_flops"]
        rows.append(r)
    counts = {k: extra[k] for k in ("pairs", "prompt_tokens", "chosen_tokens", "rejected_tokens", "patches")}
    print(f"\n== {name}: {counts}")
    mem_name = "peak CUDA MiB" if mem == "peak_cuda_mb" else "RSS delta MiB"
    head = (f"{'side':13s} {'step ms':>8s} {'p10-p90':>13s} {'xTRL':>5s} {'xtoday':>6s} {'CPU ms':>7s} "
            f"{'xTRL':>5s} {'xtoday':>6s} {mem_name:>14s} {'xTRL':>5s} {'xtoday':>6s} {'setup s':>7s} {'LM tok':>7s}")
    print(head)
    for r in rows:
        spread = f"{1e3 * r['p10_step_s']:.0f}-{1e3 * r['p90_step_s']:.0f}"
        x = lambda key, r=r: " ".join(f"{r.get(f'{key}_vs_{b}', float('nan')):{w}.2f}" for b, w in BASES)
        print(
            f"{r['side']:13s} {1e3 * r['median_step_s']:8.1f} {spread:>13s} {x('step_ratio')} "
            f"{1e3 * r['median_step_cpu_s']:7.1f} {x('cpu_step_ratio')} {r[mem]:14.1f} {x('memory_ratio')} "
            f"{r['setup_s']:7.1f} {r['lm_tokens_per_step']:7d}"
            + (f"  {r['tokens_per_s']:.0f} tok/s  MFU {100 * r['mfu']:.1f}%" if args.gpu else "")
        )
    print("model FLOPs per step (6/param/token trained, 2 for a forward; TRL adds its live reference; ours "
          "pay a reference forward once per run):")
    for model_name, table in extra["flops"].items():
        line = "  ".join(f"{path} {table[path]['flops_per_step']:.3g}" for path in ("trl", "unshared", "shared"))
        ratio = table["shared"]["flops_per_step"] / table["unshared"]["flops_per_step"]
        vs_trl = table["shared"]["flops_per_step"] / table["trl"]["flops_per_step"]
        print(f"  {model_name:6s} {line}   shared/today {ratio:.2f}  shared/TRL {vs_trl:.2f}")
    return {**extra, "sides": rows}


def pair_set(name: str, work: Path, args) -> tuple[Path, tuple[int, int]]:
    """The pairs file and pixel budget of one set."""
    if name == "colour":
        return bench_pairs(work, args.batch), TINY_PIXELS
    words = {"long-prompt": args.short_words, "long-answer": args.words}[name]
    return synthetic_pairs(work, args.batch, words, name), BIG_PIXELS


def flop_tables(policy, extra: dict, gpu_size: str | None, vision_trained: bool) -> dict:
    """:func:`bench_models.path_flops` of the set's token counts for the benchmarked model and the
    published 3B / 7B shapes (parameter counts on the meta device)."""
    from transformers import AutoProcessor

    tables = {gpu_size or "bench": path_flops(extra, extra["lm_params"], extra["vision_params"], vision_trained)}
    tokenizer = AutoProcessor.from_pretrained(policy).tokenizer
    for size in ("3b", "7b"):
        if size != gpu_size:
            tables[size] = path_flops(extra, *parameter_counts(qwen_vl_config(tokenizer, size)), vision_trained)
    return tables


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--gpu", action="store_true", help="CUDA, random Qwen2.5-VL-{3b,7b}-shaped model, bf16"
    )
    parser.add_argument("--size", choices=sorted(SHAPES), default="3b")
    parser.add_argument("--batch", type=int, default=4, help="pairs per step (the whole set is one batch)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--sets", default="long-prompt,long-answer", help="long-prompt, long-answer, colour")
    parser.add_argument("--words", type=int, default=150, help="words per response, long-answer set")
    parser.add_argument("--short-words", type=int, default=4, help="words per response, long-prompt set")
    parser.add_argument("--sides", default="trl,unshared,shared", help=f"trl, {', '.join(OURS)}")
    parser.add_argument(
        "--repeats", type=int, default=3, help="processes per side, interleaved; medians reported"
    )
    parser.add_argument(
        "--freeze-vision", action="store_true", help="every side: the vision tower frozen but its merger "
        "(train.freeze=[vision], what the shipped R1V / Qwen2.5-VL-7B recipes do)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here too")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU (default: by name)"
    )
    for hidden in ("--side", "--policy", "--pairs-file", "--work"):
        parser.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--min-pixels", type=int, default=TINY_PIXELS[0], help=argparse.SUPPRESS)
    parser.add_argument("--max-pixels", type=int, default=TINY_PIXELS[1], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:  # a subprocess running one side
        print("RESULT " + json.dumps(run_side(args.side, args)), flush=True)
        return 0
    import torch

    if args.gpu and not torch.cuda.is_available() and args.size != "tiny":
        print("bench_train --gpu: skipped, no CUDA device is available (CPU mode: run without --gpu)")
        return 0
    summary = {"mode": "gpu" if args.gpu else "cpu", "batch": args.batch, "steps_timed": args.steps,
               "repeats": args.repeats, "freeze_vision": args.freeze_vision, "sets": {}}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as work:
        args.work = work
        if args.gpu:
            args.policy = gpu_policy(Path(work), args.size)
            name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
            peak = args.peak_tflops * 1e12 if args.peak_tflops else next(
                (v for k, v in PEAK_BF16.items() if k in name), float("nan"))
            summary.update(device=name, size=args.size)
        else:
            from mpo.cli.tiny import save_policy

            args.policy = save_policy(Path(work) / "policy", 0)
            summary.update(device="cpu, 1 thread", size="tiny")
        sides = args.sides.split(",")
        for set_name in args.sets.split(","):
            args.pairs_file, (args.min_pixels, args.max_pixels) = pair_set(set_name, Path(work), args)
            extra = tokens_and_flops(args.policy, args.pairs_file, args.min_pixels, args.max_pixels)
            size = args.size if args.gpu else None
            extra["flops"] = flop_tables(args.policy, extra, size, not args.freeze_vision)
            extra["paths"] = next(iter(extra["flops"].values()))
            if args.gpu:
                extra["peak_flops"] = peak
            runs = {side: [] for side in sides}
            for _ in range(args.repeats):  # interleaved, so slow drifts of the machine hit every side alike
                for side in sides:
                    runs[side].append(spawn(side, args))
            results = {side: aggregate(r) for side, r in runs.items()}
            summary["sets"][set_name] = report(set_name, results, extra, args)
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
