"""nlc train: train a spec's model; the spec's `train` block gives the defaults, flags override them."""

from __future__ import annotations

import argparse
import sys

from nlc.cli.common import report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", metavar="SPEC", help="the .nl file")
    p.add_argument("name", nargs="?", metavar="NAME", help="the model to train when the file declares several")
    p.add_argument("--out", metavar="DIR", help="output directory (default: runs/MODEL)")
    p.add_argument("--steps", type=int, help="outer steps in the whole run (the schedule spans them)")
    p.add_argument("--until", type=int, metavar="STEP", help="stop after this step; continue later with --resume")
    p.add_argument("--batch", type=int, help="global batch: sequences per step, split across processes")
    p.add_argument("--context", type=int, help="training sequence length in tokens")
    p.add_argument("--lr", type=float, help="peak learning rate of the main optimiser")
    p.add_argument("--data", metavar="SOURCE", help='bytes("path"), a file path, corpus, mqar(...), niah(...), copy(...), parity(...)')
    p.add_argument("--seed", type=int, help="seeds the initial weights and the batches")
    p.add_argument("--eval-every", type=int, metavar="N", help="steps between validation, checkpoint and plot")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None, help="always show the progress bar")
    bar.add_argument("--no-progress", dest="progress", action="store_false", help="never show the progress bar")


def run(args: argparse.Namespace) -> int:
    from nlc.cli import UsageError
    from nlc.train.loop import Diverged, FlagError, Options, SpecError, TrainError, train

    options = Options(
        spec=args.spec,
        name=args.name,
        out=args.out,
        steps=args.steps,
        until=args.until,
        batch=args.batch,
        context=args.context,
        lr=args.lr,
        data=args.data,
        seed=args.seed,
        eval_every=args.eval_every,
        resume=args.resume,
        device=args.device,
        compile=args.compile,
        progress=args.progress,
    )
    try:
        result = train(options)
    except FlagError as e:
        raise UsageError(str(e)) from None
    except Diverged as e:
        print(f"nlc train: diverged: {e}", file=sys.stderr)
        return 3
    except SpecError as e:
        report(e.diagnostics, e.sources)
        return 1
    except TrainError as e:
        print(f"nlc train: error: {e}", file=sys.stderr)
        return 1
    if not result.main:
        return 0
    parts = [f"step {result.step}", f"loss {result.loss:.4f}"]
    if result.val_bpb is not None:
        parts.append(f"validation {result.val_bpb:.4f} bits per token")
    print(f"nlc train: {', '.join(parts)}; outputs in {result.out}", file=sys.stderr)
    return 0
