"""Transformer++, DeltaNet, Gated DeltaNet, Titans and Hope at the same size, trained the same way.

    .venv/bin/python -m bench.compare --out runs/compare --plot docs/img/compare_loss.png

The defaults are the run of docs/results.md. Each model of `specs/bench/` (the catalogue's,
resized to about 0.96 M parameters; `titans_learned_lr` is Titans with a learned memory lr) is
trained by the real training loop (`nlc.train.loop.train`) with the same seed, steps, batch,
context and learning-rate schedule:

1. on `corpus` for `--steps` steps: validation bits per byte (the loop's fixed held-out windows)
   and training tokens per second (the median over the steps, validation excluded);
2. from scratch on `mqar` for `--mqar-steps` steps at a short context: exact-match accuracy on
   fresh batches (`nlc.train.evaluate.task_accuracy`).

Before training, a probe times one step on `--probe-tokens` tokens of each sequence; a model whose
projected corpus run exceeds `--max-minutes` is not trained and the table says so, with the
measured speed. Warnings of a fallback to a slow path are collected into the notes. The script
prints a markdown table and writes `results.json` and the runs under `--out`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

import nlc
from nlc.train.checkpoint import load_model
from nlc.train.data import DataError, corpus_data, parse_data_flag
from nlc.train.evaluate import task_accuracy
from nlc.train.loop import Diverged, Options, sequence_loss, task_chunk, train
from nlc.train.tasks import make_task

SPECS = Path(__file__).resolve().parent.parent / "specs" / "bench"
MODELS = {  # table name: (spec file, model name)
    "transformer": ("transformer.nl", "transformer_matched"),
    "deltanet": ("deltanet.nl", "deltanet_matched"),
    "gated_deltanet": ("gated_deltanet.nl", "gated_deltanet_matched"),
    "titans": ("titans.nl", "titans_matched"),
    "titans_learned_lr": ("titans_learned_lr.nl", "titans_learned_lr"),
    "hope": ("hope.nl", "hope_matched"),
}
MQAR_EVAL_BATCHES = 8
MQAR_EVAL_SEED = 1234


@dataclass
class Row:
    model: str
    params: int
    probe_s_per_step: float
    notes: list[str] = field(default_factory=list)
    val_bpb: float | None = None
    tokens_per_s: float | None = None
    corpus_wall_s: float | None = None
    curve: list[tuple[int, float, float]] = field(default_factory=list)  # (step, seconds of training, val bpb)
    mqar_accuracy: float | None = None
    mqar_wall_s: float | None = None


def probe(model: torch.nn.Module, batch: int, tokens: int) -> tuple[float, list[str]]:
    """Seconds of one forward and backward on `[batch, tokens]` bytes, the second of two (the first pays for
    one-time setup), and the warnings they raised."""
    chunk = task_chunk(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x = torch.randint(0, 256, (batch, tokens + 1))
        sequence_loss(model, model, x[:, :-1], x[:, 1:], chunk, contextlib.nullcontext)
        start = time.perf_counter()
        sequence_loss(model, model, x[:, :-1], x[:, 1:], chunk, contextlib.nullcontext)
        elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed, sorted({str(w.message) for w in caught})


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def fresh(out: Path) -> Path:
    """The run directory, emptied: the loop refuses to start a fresh run over a checkpoint."""
    if out.exists():
        shutil.rmtree(out)
    return out


def run_model(name: str, args: argparse.Namespace) -> Row:
    spec_file, model_name = MODELS[name]
    spec = str(SPECS / spec_file)
    torch.manual_seed(args.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the probe below records them
        model = nlc.load(spec, model_name)
    params = sum(p.numel() for p in model.parameters())
    probe_s, caught = probe(model, args.batch, args.probe_tokens)
    row = Row(name, params, probe_s, [f"warning: {text}" for text in caught])
    projected_s = args.steps * probe_s * args.context / args.probe_tokens
    if projected_s > args.max_minutes * 60:
        row.notes.insert(
            0,
            f"not trained: one step of {args.batch} x {args.probe_tokens} tokens took {probe_s:.1f} s "
            f"({args.batch * args.probe_tokens / probe_s:.1f} tokens/s), so {args.steps} steps of {args.batch} x {args.context} "
            f"would take about {projected_s / 3600:.1f} h, over the {args.max_minutes:g} min allowed",
        )
        return row

    common = {"spec": spec, "name": model_name, "batch": args.batch, "seed": args.seed, "device": "cpu", "progress": False}
    out = fresh(args.out / name / "corpus")
    start = time.perf_counter()
    try:
        result = train(Options(**common, out=str(out), steps=args.steps, context=args.context, data="corpus", eval_every=args.eval_every), log=print)
        row.val_bpb = result.val_bpb
    except Diverged as e:
        row.notes.insert(0, f"corpus run diverged: {e}")
    row.corpus_wall_s = time.perf_counter() - start
    rows = read_metrics(out) if (out / "metrics.jsonl").exists() else []
    row.tokens_per_s = statistics.median(r["tokens_per_s"] for r in rows) if rows else None
    elapsed = 0.0
    for r in rows:
        elapsed += args.batch * args.context / r["tokens_per_s"]
        if "val_bpb" in r:
            row.curve.append((r["step"], elapsed, r["val_bpb"]))

    if args.mqar_steps > 0:
        out = fresh(args.out / name / "mqar")
        start = time.perf_counter()
        try:
            train(
                Options(**common, out=str(out), steps=args.mqar_steps, context=args.mqar_context, data=args.mqar, eval_every=args.mqar_steps, lr=args.mqar_lr),
                log=print,
            )
        except Diverged as e:
            row.notes.append(f"mqar run diverged: {e}")
            return row
        row.mqar_wall_s = time.perf_counter() - start
        trained, _ = load_model(out)
        generator = torch.Generator().manual_seed(MQAR_EVAL_SEED)
        row.mqar_accuracy = task_accuracy(
            trained, make_task(parse_data_flag(args.mqar)), generator, MQAR_EVAL_BATCHES, args.batch, args.mqar_context, args.mqar_context
        )
    return row


def table(rows: list[Row], args: argparse.Namespace) -> str:
    lines = [
        f"| model | parameters | validation bpb ({args.steps} steps) | train tokens/s | corpus run (s) | {args.mqar} accuracy ({args.mqar_steps} steps) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.corpus_wall_s is None:
            lines.append(
                f"| {row.model} | {row.params:,} | not trained (see notes) | {args.batch * args.probe_tokens / row.probe_s_per_step:.1f} (probe) | - | - |"
            )
            continue
        bpb = f"{row.val_bpb:.4f}" if row.val_bpb is not None else "diverged (see notes)"
        speed = f"{row.tokens_per_s:,.0f}" if row.tokens_per_s is not None else "-"
        mqar = f"{row.mqar_accuracy:.3f}" if row.mqar_accuracy is not None else "-"
        lines.append(f"| {row.model} | {row.params:,} | {bpb} | {speed} | {row.corpus_wall_s:.0f} | {mqar} |")
    notes = [f"- {row.model}: {note}" for row in rows for note in row.notes]
    return "\n".join(lines + (["", *notes] if notes else []))


def plot(rows: list[Row], path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for row in rows:
        if not row.curve:
            continue
        steps, seconds, bpb = zip(*row.curve)
        by_step.plot(steps, bpb, "o-", markersize=3, label=f"{row.model} ({row.params / 1e6:.2f} M)")
        by_time.plot(seconds, bpb, "o-", markersize=3, label=row.model)
    by_step.set_xlabel("step")
    by_time.set_xlabel("training seconds (validation excluded)")
    by_step.set_ylabel("validation bits per byte")
    for axes in (by_step, by_time):
        axes.grid(alpha=0.3)
    by_step.legend()
    figure.suptitle(f"corpus, batch {args.batch} x {args.context} bytes, seed {args.seed}, {torch.get_num_threads()} CPU threads")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--steps", type=int, default=100, help="corpus training steps")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mqar-steps", type=int, default=100, help="mqar training steps (0: skip)")
    parser.add_argument("--mqar", default="mqar(keys: 4, queries: 4, vocab: 16)", help="the task, in the spec's syntax")
    parser.add_argument("--mqar-context", type=int, default=32)
    parser.add_argument("--mqar-lr", type=float, default=3e-3, help="peak lr of the mqar runs")
    parser.add_argument("--probe-tokens", type=int, default=32)
    parser.add_argument("--max-minutes", type=float, default=30.0, help="largest projected corpus run a model may take")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    parser.add_argument("--plot", type=Path, default=None, help="the validation curves (PNG); default OUT/compare_loss.png")
    args = parser.parse_args()
    names = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = [name for name in names if name not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    try:
        make_task(parse_data_flag(args.mqar)).check_model(vocab=256, context=args.mqar_context)
    except (DataError, ValueError) as e:
        parser.error(f"--mqar: {e}")

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    data = corpus_data()
    print(f"corpus: {len(data.train):,} training bytes, {len(data.held_out):,} held out")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    start = time.perf_counter()
    rows = []
    for name in names:
        print(f"\n== {name}")
        rows.append(run_model(name, args))
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; total {time.perf_counter() - start:.0f} s\n")
    report = table(rows, args)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps([row.__dict__ for row in rows], indent=1))
    plot_path = args.plot or args.out / "compare_loss.png"
    plot(rows, plot_path, args)
    print(f"\nplot: {plot_path}")


if __name__ == "__main__":
    main()
