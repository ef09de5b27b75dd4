"""nlc eval: a trained checkpoint's accuracy on a synthetic task (per length for niah), its validation
bits per byte, or (--stream) its loss along a long document read with the state carried."""

from __future__ import annotations

import argparse
from pathlib import Path

from nlc.cli.common import report, spec_paths
from nlc.spec import load_spec

TASKS = ("mqar", "niah", "copy", "parity", "bytes", "corpus")


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def lengths_list(text: str) -> list[int]:
    return [positive(part.strip()) for part in text.split(",") if part.strip()] or [positive(text)]


def add_checkpoint_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", metavar="SPEC", help="the .nl file the checkpoint was trained from")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="the training run's output directory")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(p)
    p.add_argument("--task", choices=TASKS, help="what to evaluate (default: the spec's train.data)")
    p.add_argument("--data", metavar="SOURCE", help='the data in the spec\'s syntax: bytes("file"), corpus, mqar(keys: 8), ...')
    p.add_argument("--lengths", type=lengths_list, metavar="L,L,...", help="niah: sequence lengths (default: 1, 2 and 4 times the spec's)")
    p.add_argument("--batches", type=positive, default=8, metavar="N", help="batches to average over (default: 8)")
    p.add_argument("--batch-size", type=positive, metavar="B", help="sequences per batch (default: the spec's train.batch)")
    p.add_argument("--seed", type=int, metavar="S", help="seed of the evaluation batches (default: the training loop's validation seed)")
    p.add_argument("--stream", metavar="FILE", help="read FILE through the model with the state carried; print the loss per segment")
    p.add_argument("--segment", type=positive, metavar="N", help="--stream: tokens per segment (default: the model's context)")
    p.add_argument("--plot", metavar="PATH", help="--stream: where to draw loss vs position (default: DIR/loss_stream.png)")
    p.add_argument("--fresh", action="store_true", help="--stream: also read every segment from a fresh state, for comparison")


def load_checkpoint(args: argparse.Namespace):
    """(IR model declaration, nn.Module with the checkpoint's weights) for `SPEC --checkpoint DIR`,
    or None after reporting the spec's diagnostics."""
    from nlc.cli import UsageError
    from nlc.spec import schema as s
    from nlc.train.checkpoint import CheckpointError, load_model

    (path,) = spec_paths([args.spec])
    spec, diagnostics, sources = load_spec(path)
    if diagnostics:
        report(diagnostics, sources)
        return None
    decl = spec.get()
    if not isinstance(decl, s.Model):
        raise UsageError(f"'{path}' declares no model to evaluate")
    if not Path(args.checkpoint).is_dir():
        raise UsageError(f"checkpoint directory '{args.checkpoint}' does not exist")
    try:
        model, _ = load_model(args.checkpoint, path)
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    except (RuntimeError, KeyError) as e:  # weights that do not fit the model the spec builds
        raise UsageError(f"the checkpoint in '{args.checkpoint}' does not fit the model of '{path}': {e}") from None
    model.eval()
    return decl, model


def check_flags(args: argparse.Namespace) -> None:
    from nlc.cli import UsageError

    if args.stream is not None:
        clashing = [flag for flag, value in (("--task", args.task), ("--data", args.data), ("--lengths", args.lengths)) if value is not None]
        if clashing:
            raise UsageError(f"--stream reads a file; it does not take {', '.join(clashing)}")
    else:
        stray = [flag for flag, value in (("--segment", args.segment), ("--plot", args.plot), ("--fresh", args.fresh or None)) if value is not None]
        if stray:
            raise UsageError(f"{', '.join(stray)} only apply with --stream FILE")


def data_node(args: argparse.Namespace, decl):
    """The data to evaluate on: --data, else --task (with the spec's arguments when it names that
    kind), else the spec's train.data."""
    from pydantic import TypeAdapter

    from nlc.cli import UsageError
    from nlc.spec.schema import Data
    from nlc.train.data import DataError, parse_data_flag

    trained = decl.train.data
    if args.data is not None:
        try:
            node = parse_data_flag(args.data)
        except DataError as e:
            raise UsageError(str(e)) from None
        if args.task is not None and node.kind != args.task:
            raise UsageError(f"--task {args.task} and --data {args.data} name different data")
    elif args.task is None or args.task == trained.kind:
        node = trained
    elif args.task == "bytes":
        raise UsageError(f"--task bytes needs the file: add --data FILE (the spec trains on {trained.kind})")
    else:
        node = TypeAdapter(Data).validate_python({"kind": args.task})
    if args.lengths is not None and node.kind != "niah":
        raise UsageError(f"--lengths applies to niah, not {node.kind}")
    return node


def run(args: argparse.Namespace) -> int:
    check_flags(args)
    loaded = load_checkpoint(args)
    if loaded is None:
        return 1
    decl, model = loaded
    if args.stream is not None:
        return run_stream(args, decl, model)
    return run_data(args, decl, model)


def run_data(args: argparse.Namespace, decl, model) -> int:
    import torch

    from nlc.cli import UsageError
    from nlc.train.data import VALIDATION_SEED, DataError, make_data
    from nlc.train.evaluate import bits_per_byte, task_accuracy
    from nlc.train.tasks import NIAH_MIN_LENGTH, make_task

    node = data_node(args, decl)
    batch = args.batch_size or decl.train.batch
    generator = torch.Generator().manual_seed(VALIDATION_SEED if args.seed is None else args.seed)
    context = decl.context
    if node.kind in ("bytes", "corpus"):
        if decl.vocab < 256:
            raise UsageError(f"{node.kind} data are bytes, but the model's vocab is {decl.vocab} (< 256)")
        try:
            source = make_data(node, context)
        except DataError as e:
            raise UsageError(str(e)) from None
        bpb = bits_per_byte(model, source, generator, args.batches, batch, context)
        print(f"{source.name}: validation {bpb:.4f} bits per byte ({args.batches} x {batch} windows of {context} bytes)")
        return 0
    try:
        task = make_task(node)
        task.check_model(decl.vocab, None if node.kind == "niah" else context)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if node.kind != "niah":
        accuracy = task_accuracy(model, task, generator, args.batches, batch, context, context)
        print(f"{task.name}: accuracy {accuracy:.4f} ({args.batches} x {batch} sequences of {context} tokens)")
        return 0
    lengths = args.lengths or [node.length, 2 * node.length, 4 * node.length]
    if min(lengths) < NIAH_MIN_LENGTH:
        raise UsageError(f"--lengths: niah sequences hold at least {NIAH_MIN_LENGTH} tokens, got {min(lengths)}")
    print(f"niah accuracy by length (training context {context}; {args.batches} x {batch} sequences each)")
    print(f"{'length':>8}  {'accuracy':>8}")
    for length in lengths:
        accuracy = task_accuracy(model, task.at_length(length), generator, args.batches, batch, length, context)
        beyond = "  (beyond the training context)" if length > context else ""
        print(f"{length:>8}  {accuracy:>8.4f}{beyond}")
    return 0


def run_stream(args: argparse.Namespace, decl, model) -> int:
    import math

    from nlc.cli import UsageError
    from nlc.train.data import DataError, read_bytes
    from nlc.train.evaluate import plot_stream, stream

    try:
        data = read_bytes(args.stream)
    except DataError as e:
        raise UsageError(str(e)) from None
    if len(data) < 2:
        raise UsageError(f"'{args.stream}' has {len(data)} byte; a stream needs at least 2")
    if decl.vocab < 256 and int(data.max()) >= decl.vocab:
        raise UsageError(f"'{args.stream}' holds byte {int(data.max())}, outside the model's vocab of {decl.vocab}")
    segment = args.segment or decl.context
    plot = Path(args.plot) if args.plot else Path(args.checkpoint) / "loss_stream.png"
    if not plot.parent.is_dir():
        raise UsageError(f"--plot: directory '{plot.parent}' does not exist")
    result = stream(model, data, segment)
    fresh = stream(model, data, segment, carry=False) if args.fresh else None
    print(f"{args.stream}: {len(data)} bytes in segments of {segment}; loss of predicting each segment's bytes from the previous ones")
    header = f"{'segment':>7}  {'positions':>15}  {'carried (nats)':>14}  {'bits/byte':>9}"
    print(header + (f"  {'fresh (nats)':>12}  {'bits/byte':>9}" if fresh else ""))
    rows = [(str(i), f"{start + 1}-{end}", loss) for i, (start, end, loss) in enumerate(result.segments)]
    rows.append(("all", f"1-{len(data) - 1}", result.losses.mean().item()))
    baseline = [loss for _, _, loss in fresh.segments] + [fresh.losses.mean().item()] if fresh else None
    for j, (name, span, loss) in enumerate(rows):
        line = f"{name:>7}  {span:>15}  {loss:>14.4f}  {loss / math.log(2):>9.4f}"
        print(line + (f"  {baseline[j]:>12.4f}  {baseline[j] / math.log(2):>9.4f}" if fresh else ""))
    curves = {"state carried": result} | ({"fresh state per segment": fresh} if fresh else {})
    plot_stream(curves, str(plot), f"{decl.name}: loss along {Path(args.stream).name}")
    print(f"plot: {plot}")
    return 0
