"""Training throughput on CPU: tokens/s of one forward + backward of Hope (specs/hope.nl), with Titans
(specs/titans.nl) and DeltaNet (specs/deltanet.nl) for scale. The loss is next-token cross-entropy on
random bytes; each figure is the median of --repeats timed steps after one warm-up step, as tokens per
wall-clock second and per CPU second of the process (steadier on a shared machine; with several threads it
counts every thread's time, spinning included).

With `--baseline REV` the same models are also built from a copy of the working tree whose `nlc/runtime`
is that of git revision REV (run in a subprocess), timed in alternation with the working tree so that
both columns see the same machine load and the same `nlc.ops`. With `--without PATH` the baseline is the
working tree with that fast path (a name `nlc info` prints, e.g. matrix.scaled_chunk) left out of dispatch.

    .venv/bin/python -m bench.hope [--batch 4] [--length 128] [--threads 1] [--repeats 5] [--baseline HEAD]
    .venv/bin/python -m bench.hope --specs omeganet --without matrix.scaled_chunk
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPECS = ("hope", "titans", "deltanet")
ROOT = Path(__file__).resolve().parent.parent


def step_seconds(spec: str, batch: int, length: int, repeats: int) -> list[tuple[float, float]]:
    """(wall-clock, process CPU) seconds of `repeats` forward + backward steps of one freshly built model."""
    import torch
    import torch.nn.functional as F

    import nlc

    torch.manual_seed(0)
    model = nlc.load(f"specs/{spec}.nl")
    tokens = torch.randint(0, 256, (batch, length + 1))

    def step():
        out = model(tokens[:, :-1])
        logits = out[0] if isinstance(out, tuple) else out  # [B, T, vocab]
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        model.zero_grad(set_to_none=True)

    step()
    times = []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        times.append((time.perf_counter() - start, time.process_time() - cpu_start))
    return times


def worker(args) -> None:
    """Run in the tree given as the working directory: print one JSON line of step times per spec."""
    import torch

    import nlc

    if not Path(nlc.__file__).resolve().is_relative_to(Path.cwd().resolve()):
        raise RuntimeError(f"nlc imported from {nlc.__file__}, not from the tree under test {Path.cwd()}")
    torch.set_num_threads(args.threads)
    if args.without:
        from nlc.ops.memory import dispatch

        names = [name.removeprefix("nlc.ops.") for name in dispatch.FAST_PATHS]
        if args.without not in names:
            raise SystemExit(f"--without: no fast path {args.without!r}; there are {', '.join(names)}")
        dispatch.FAST_PATHS = tuple(name for name in dispatch.FAST_PATHS if name.removeprefix("nlc.ops.") != args.without)
    result = {spec: step_seconds(spec, args.batch, args.length, args.repeats) for spec in args.specs}
    print(json.dumps(result))


def measure(tree: Path, args, specs: list[str], without: str | None = None) -> dict[str, list[float]]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--batch", str(args.batch), "--length", str(args.length)]
    command += ["--threads", str(args.threads), "--repeats", str(args.repeats), "--specs", *specs]
    if without:
        command += ["--without", without]
    env = dict(os.environ, PYTHONPATH=str(tree))
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"timing in {tree} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def copy_tree(into: Path, runtime_rev: str | None = None) -> Path:
    """A snapshot of the working tree, optionally with nlc/runtime as of git revision `runtime_rev` (the
    runtime's own change, over the same ops)."""
    for part in ("nlc", "specs", "grammar"):
        shutil.copytree(ROOT / part, into / part, ignore=shutil.ignore_patterns("__pycache__"))
    if runtime_rev is not None:
        archive = subprocess.run(["git", "archive", runtime_rev, "nlc/runtime"], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of baseline and working tree")
    parser.add_argument("--baseline", default=None, help="git revision to compare against")
    parser.add_argument("--without", default=None, help="fast path to leave out of the baseline, e.g. matrix.scaled_chunk")
    parser.add_argument("--specs", nargs="+", default=list(SPECS))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.baseline is not None and args.without is not None:
        parser.error("--baseline and --without each give the baseline column: pass one")

    tokens = args.batch * args.length
    print(f"forward + backward, B={args.batch} T={args.length}, {args.threads} thread(s), median of timed steps")
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"current": (ROOT, None)}  # column -> (tree, fast path left out)
        if args.baseline is not None:
            trees = {
                f"runtime@{args.baseline}": (copy_tree(Path(tmp) / "baseline", args.baseline), None),
                "current": (copy_tree(Path(tmp) / "current"), None),
            }
        elif args.without is not None:
            trees = {f"no {args.without}": (ROOT, args.without), "current": (ROOT, None)}
        times = {name: {spec: [] for spec in args.specs} for name in trees}
        for _ in range(args.rounds):
            for name, (tree, without) in trees.items():
                for spec, t in measure(tree, args, args.specs, without).items():
                    times[name][spec] += t
    columns = [(name, clock) for name in trees for clock in ("wall", "cpu")]
    width = max(26, *(len(name) + 14 for name in trees))
    print(f"{'model':<10}" + "".join(f"{f'{name} tok/{clock}-s':>{width}}" for name, clock in columns) + ("   speed-up wall, cpu" if len(trees) == 2 else ""))
    for spec in args.specs:
        rates = {(name, clock): tokens / statistics.median(t[i] for t in times[name][spec]) for name in trees for i, clock in enumerate(("wall", "cpu"))}
        row = f"{spec:<10}" + "".join(f"{rates[c]:>{width}.0f}" for c in columns)
        if len(trees) == 2:
            base, current = trees
            row += "".join(f"{rates[current, clock] / rates[base, clock]:>10.2f}x" for clock in ("wall", "cpu"))
        print(row)


if __name__ == "__main__":
    main()
