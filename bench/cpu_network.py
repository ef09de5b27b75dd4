"""Titans-style deep memory on CPU, forward + backward: nlc's dual-form path vs titans-pytorch and the oracle.

A 2-layer MLP memory (expansion 4, gelu, layer norm + residual, as titans-pytorch's default memory model),
momentum and weight decay, dim 256 in 4 heads, float32, grouped in two ways:
  batch = 64  mini-batches: gradients at the mini-batch start, every token reads the state after its own
              write (LANGUAGE.md §4), so the reads need the dual form's causal masked products;
  every = 64  one write per chunk of 64 tokens, read from the next chunk on: titans-pytorch's computation
              with batch_size = chunk_size = 64 (docs/references.md, up to a one-token read shift).
titans-pytorch runs with chunk_size 64, once with its default batch_size=None (every chunk's gradient at the
call's initial weights) and once with batch_size=64. All layers carry the same surroundings: an input rms norm,
q/k/v projections, per-token sigmoid gates, an output projection. Prints tokens/s and ratios measured in this
run, and the matmul work of each implementation (GFLOP per forward + backward, as torch's FlopCounterMode counts
it) with the rate it achieves.

    .venv/bin/python -m bench.cpu_network [--batch 4] [--length 2048] [--oracle-length 64] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from bench.flops import matmul_flop_counter
from nlc.ops.memory.naive import initial_state, memory_naive
from nlc.ops.memory.rule import Gates, Rule, Structure, StructureParams
from nlc.ops.memory.structure import weight_shapes
from nlc.ops.network import chunk

DIM, HEADS, CHUNK, EXPAND, MAX_LR = 256, 4, 64, 4.0, 1e-2


class TitansStyleMemory(nn.Module):
    """The titans-pytorch NeuralMemory recipe around an `nlc.ops` memory op."""

    def __init__(self, op, grouping: str = "batch"):
        """grouping "batch": mini-batches of CHUNK tokens (every token reads its own state); "every": one write per
        chunk of CHUNK tokens, read from the next chunk on."""
        super().__init__()
        self.op = op
        head = DIM // HEADS
        self.rule = Rule(
            structure=Structure("mlp", depth=2, expand=EXPAND, act="gelu", residual=True, norm="layer"),
            objective="l2",
            retention="weight_decay",
            update="momentum",
            **{grouping: CHUNK},
        )
        self.norm = nn.RMSNorm(DIM, elementwise_affine=False)
        self.qkv = nn.Linear(DIM, 3 * DIM, bias=False)
        self.gates = nn.Linear(DIM, 3 * HEADS)
        self.out = nn.Linear(DIM, DIM, bias=False)
        self.init_weights = nn.ParameterList(
            nn.Parameter(torch.randn(HEADS, *shape) * shape[1] ** -0.5) for shape in weight_shapes(self.rule.structure, head, head)
        )
        self.norm_weight = nn.Parameter(torch.ones(HEADS, head))
        self.norm_bias = nn.Parameter(torch.zeros(HEADS, head))

    def forward(self, x):
        b, t, _ = x.shape
        x = self.norm(x)
        q, k, v = self.qkv(x).view(b, t, 3, HEADS, -1).permute(2, 0, 3, 1, 4)  # [B, H, T, d] each
        lr, beta, lam = self.gates(x).sigmoid().view(b, t, 3, HEADS).permute(2, 0, 3, 1)  # [B, H, T] each
        gates = Gates(lr=MAX_LR * lr, beta=beta, lam=MAX_LR * lam)
        weights = tuple(w.expand(b, *w.shape) for w in self.init_weights)  # [B, H, out, in]
        sparams = StructureParams(norm_weight=self.norm_weight, norm_bias=self.norm_bias)
        o, _ = self.op(q, k, v, gates, self.rule, initial_state(self.rule, weights), sparams)
        return self.out(o.transpose(1, 2).reshape(b, t, DIM))


def titans_pytorch_memory(batch_size=None):
    """batch_size None: every chunk's gradient at the call's initial weights (its default); 64: the weights
    are updated every 64 tokens, so gradients are taken where nlc's batch = 64 takes them."""
    from titans_pytorch import NeuralMemory

    return NeuralMemory(
        dim=DIM,
        heads=HEADS,
        dim_head=DIM // HEADS,
        chunk_size=CHUNK,
        batch_size=batch_size,
        momentum=True,
        default_step_transform_max_lr=MAX_LR,
        default_model_kwargs={"depth": 2, "expansion_factor": EXPAND},
    )


def matmul_gflop(layer, batch: int, length: int) -> float:
    """GFLOP of one forward + backward, as FlopCounterMode counts them (matmuls)."""
    x = torch.randn(batch, length, DIM)
    with matmul_flop_counter() as counter:
        out = layer(x)
        out = out[0] if isinstance(out, tuple) else out
        out.square().mean().backward()
    return counter.get_total_flops() / 1e9


def tokens_per_second(layers: dict, batch: int, length: int, repeats: int) -> dict:
    """Median tokens/s of each layer's forward + backward. The layers take turns within each round, so a
    change in the machine's load during the run falls on all of them alike."""
    x = torch.randn(batch, length, DIM)

    def step(layer, x):
        out = layer(x)
        out = out[0] if isinstance(out, tuple) else out
        out.square().mean().backward()

    for layer in layers.values():
        step(layer, x[:, : min(length, 2 * CHUNK)])  # warm-up
    times = {name: [] for name in layers}
    for _ in range(repeats):
        for name, layer in layers.items():
            start = time.perf_counter()
            step(layer, x)
            times[name].append(time.perf_counter() - start)
    return {name: batch * length / statistics.median(t) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--oracle-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, forward + backward")
    print(f"B={args.batch} dim={DIM} heads={HEADS} mlp(depth 2, expand {EXPAND}) momentum weight_decay, groups of {CHUNK}")

    ours = {"nlc network.chunk batch=64": "batch", "nlc network.chunk every=64": "every"}
    long = {name: TitansStyleMemory(chunk.apply, grouping) for name, grouping in ours.items()}
    try:
        for batch_size in (None, CHUNK):
            long[f"titans-pytorch NeuralMemory batch_size={batch_size}"] = titans_pytorch_memory(batch_size)
    except ImportError as e:
        print(f"titans-pytorch rows skipped: {e}")
    rates = tokens_per_second(long, args.batch, args.length, args.repeats)
    short = {name: TitansStyleMemory(chunk.apply, grouping) for name, grouping in ours.items()}
    short |= {f"oracle memory_naive {grouping}=64": TitansStyleMemory(memory_naive, grouping) for grouping in ours.values()}
    short_rates = tokens_per_second(short, args.batch, args.oracle_length, 1)
    work = {name: matmul_gflop(layer, args.batch, args.length) for name, layer in long.items()}

    print(f"{'implementation':<52} {'tokens/s':>10} {'GFLOP/step':>11} {'GFLOP/s':>8}")
    for table, length in ((rates, args.length), (short_rates, args.oracle_length)):
        for name, rate in table.items():
            flops = f"{work[name]:>11.1f} {work[name] * rate / (args.batch * length):>8.1f}" if length == args.length else ""
            print(f"{f'{name}, T={length}':<52} {rate:>10.0f} {flops}")
    for name, grouping in ours.items():
        for other, rate in rates.items():
            if other not in ours:
                print(f"ratio {name} / {other} (T={args.length}): {rates[name] / rate:.2f}x")
        oracle = f"oracle memory_naive {grouping}=64"
        print(f"ratio {name} / {oracle} (T={args.oracle_length}): {short_rates[name] / short_rates[oracle]:.2f}x")


if __name__ == "__main__":
    main()
