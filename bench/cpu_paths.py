"""Every CPU fast path against the token-by-token oracle, forward + backward, as ratios measured in the same run.

For one rule of each family a fast path serves (the matrix chunk forms, windows and l2 with momentum in chunks,
the matrix recurrent path, the network dual form with mini-batches, chunk writes and a window), times the path `nlc.ops.memory.dispatch` chooses and the oracle
`memory_naive` on the same inputs (float32, keys and queries l2-normalised, gates in the test ranges), and checks
first that both give the same reads.

    .venv/bin/python -m bench.cpu_paths [--B 2] [--H 2] [--T 256] [--d 32] [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch

from nlc.ops.memory.dispatch import find_path
from nlc.ops.memory.naive import memory_naive, named_tensors
from nlc.ops.memory.rule import Rule, Structure
from tests.ops.helpers import random_inputs

TITANS_MLP = Structure("mlp", depth=2, expand=4, act="gelu", residual=True, norm="layer")
CASES = [  # (name, rule, gates drawn per channel)
    ("delta rule", Rule(), ()),
    ("gated delta rule", Rule(retention="decay"), ()),
    ("dgd", Rule(update="dgd", retention="decay"), ()),
    ("linear attention, decay", Rule(objective="dot", retention="decay"), ()),
    ("linear attention, momentum", Rule(objective="dot", update="momentum", retention="decay"), ()),
    ("GLA (per-channel decay)", Rule(objective="dot", retention="decay"), ("alpha",)),
    ("matrix l2, momentum, weight decay", Rule(update="momentum", retention="weight_decay"), ()),
    ("matrix muon", Rule(update="muon", retention="weight_decay"), ()),
    ("matrix window 4 (Omega)", Rule(window=4), ()),
    ("matrix huber, window 2", Rule(objective="huber", window=2), ()),
    ("mlp, batch 64, momentum", Rule(structure=TITANS_MLP, update="momentum", retention="weight_decay", batch=64), ()),
    ("mlp, every 64, momentum", Rule(structure=TITANS_MLP, update="momentum", retention="weight_decay", every=64), ()),
    ("mlp, batch 16, window 4, huber", Rule(structure=TITANS_MLP, objective="huber", window=4, batch=16), ()),
]


def fwd_bwd_seconds(op, inputs: dict) -> tuple[float, torch.Tensor]:
    """Wall time of one forward + backward through `op`, and its reads."""
    leaves = [t for _, t in named_tensors((inputs["q"], inputs["k"], inputs["v"], inputs["gates"], inputs["state"], inputs["sparams"]))]
    for t in leaves:
        t.grad = None
    start = time.perf_counter()
    out, _ = op(**inputs)
    out.square().mean().backward()
    return time.perf_counter() - start, out.detach()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--B", type=int, default=2)
    parser.add_argument("--H", type=int, default=2)
    parser.add_argument("--T", type=int, default=256)
    parser.add_argument("--d", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after a warm-up; the best is kept")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, B={args.B} H={args.H} T={args.T} d={args.d}, forward + backward")
    print(f"| {'rule':<34} | {'path':<19} | {'path tok/s':>10} | {'oracle tok/s':>12} | {'path / oracle':>13} |")
    print(f"|{'-' * 36}|{'-' * 21}|{'-' * 12}|{'-' * 14}|{'-' * 15}|")
    tokens = args.B * args.T
    for name, rule, per_channel in CASES:
        inputs = random_inputs(rule, B=args.B, H=args.H, T=args.T, dk=args.d, dv=args.d, dtype=torch.float32, per_channel=per_channel)
        path = find_path(rule, inputs["gates"], inputs["q"])
        if path is None:
            print(f"| {name:<34} | {'none (oracle)':<19} | {'':>10} | {'':>12} | {'':>13} |")
            continue
        ops = {"path": path.apply, "oracle": memory_naive}
        reads = {label: fwd_bwd_seconds(op, inputs)[1] for label, op in ops.items()}  # warm-up
        best = {label: float("inf") for label in ops}
        for _ in range(args.rounds):  # in turns, so that a change of machine load falls on both alike
            for label, op in ops.items():
                best[label] = min(best[label], fwd_bwd_seconds(op, inputs)[0])
        error = ((reads["path"] - reads["oracle"]).norm() / reads["oracle"].norm()).item()
        if not error < 1e-4:
            raise SystemExit(f"{name}: {path.NAME} and the oracle disagree (relative error {error:.1e})")
        rates = {label: tokens / seconds for label, seconds in best.items()}
        print(f"| {name:<34} | {path.NAME:<19} | {rates['path']:>10.0f} | {rates['oracle']:>12.0f} | {rates['path'] / rates['oracle']:>12.1f}x |")


if __name__ == "__main__":
    main()
