"""The compiler adds no overhead: a generated model against the same architecture assembled by hand
from `nlc.runtime` layers, forward + backward, timed in turns in one run; and the build time of the
whole catalogue.

    .venv/bin/python -m bench.codegen [--spec specs/deltanet.nl] [--rounds 5] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import nlc
from nlc.codegen.files import build_outputs
from nlc.runtime import MemoryConfig, MemoryLayer, MlpConfig, MlpLayer

ROOT = Path(__file__).resolve().parents[1]


class HandDeltaNet(nn.Module):
    """specs/deltanet.nl written by hand: embedding, pre-norm residual DeltaNet memory and SwiGLU MLP
    blocks, final norm, tied head. The same runtime layers, built in the same order."""

    def __init__(self, vocab: int, dim: int, depth: int, heads: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            block = nn.Module()
            block.mix_norm = nn.RMSNorm(dim)
            block.mix = MemoryLayer(MemoryConfig(dim=dim, heads=heads))
            block.ffn_norm = nn.RMSNorm(dim)
            block.ffn = MlpLayer(MlpConfig(dim=dim))
            self.blocks.append(block)
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = x + block.mix(block.mix_norm(x))[0]
            x = x + block.ffn(block.ffn_norm(x))[0]
        return self.head(self.norm(x))


def step_seconds(model: nn.Module, tokens: torch.Tensor, generated: bool) -> float:
    start = time.perf_counter()
    logits = model(tokens)[0] if generated else model(tokens)
    logits.float().square().mean().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="specs/deltanet.nl")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    outputs, diagnostics, _ = build_outputs(sorted(str(p) for p in (ROOT / "specs").glob("*.nl")), "generated")
    build = time.perf_counter() - start
    assert not diagnostics

    torch.manual_seed(0)
    generated = nlc.load(args.spec)
    c = generated.config
    hand = HandDeltaNet(c.vocab, c.dim, c.depth, c.heads)
    hand.load_state_dict(generated.state_dict())  # same names, same weights
    tokens = torch.randint(0, c.vocab, (args.batch, args.context))
    with torch.no_grad():
        torch.testing.assert_close(hand(tokens), generated(tokens)[0])
    times = {"generated": [], "by hand": []}
    for _ in range(args.rounds + 1):  # the first round warms up and is dropped
        times["generated"].append(step_seconds(generated, tokens, True))
        times["by hand"].append(step_seconds(hand, tokens, False))
    tokens_per_step = args.batch * args.context
    gen, manual = (statistics.median(times[k][1:]) for k in ("generated", "by hand"))
    print(f"{args.spec}: B={args.batch}, T={args.context}, forward + backward, median of {args.rounds}, threads {torch.get_num_threads()}")
    print("| model | tokens/s | generated / by hand |")
    print("|---|---|---|")
    print(f"| generated (nlc.load) | {tokens_per_step / gen:,.0f} | {manual / gen:.3f}x |")
    print(f"| by hand, same runtime layers | {tokens_per_step / manual:,.0f} | 1.000x |")
    print(f"build of the whole catalogue ({len(outputs)} modules, in memory): {build * 1000:.0f} ms")


if __name__ == "__main__":
    main()
