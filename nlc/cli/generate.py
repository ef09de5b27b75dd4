"""nlc generate: sample text from a checkpoint, the in-context state carried token by token."""

from __future__ import annotations

import argparse
import sys

from nlc.cli.eval import add_checkpoint_arguments, load_checkpoint, positive


def non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(p)
    p.add_argument("--prompt", required=True, metavar="TEXT", help="the text to continue (UTF-8 bytes)")
    p.add_argument("--tokens", type=positive, default=256, metavar="N", help="tokens to generate (default: 256)")
    p.add_argument("--temperature", type=non_negative, default=1.0, metavar="T", help="0 is greedy (default: 1)")
    p.add_argument("--top-k", type=positive, metavar="K", help="sample among the K likeliest tokens only")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the sampler (default: 0)")


def run(args: argparse.Namespace) -> int:
    import torch

    from nlc.cli import UsageError
    from nlc.train.generate import generate

    prompt = args.prompt.encode("utf-8")
    if not prompt:
        raise UsageError("--prompt is empty: give at least one character to continue")
    loaded = load_checkpoint(args)
    if loaded is None:
        return 1
    decl, model = loaded
    if max(prompt) >= decl.vocab:
        raise UsageError(f"the prompt holds byte {max(prompt)}, outside the model's vocab of {decl.vocab}")
    tokens = torch.tensor([list(prompt)], dtype=torch.long)  # [1, P]
    generator = torch.Generator().manual_seed(args.seed)
    out = generate(model, tokens, args.tokens, args.temperature, args.top_k, generator)  # [1, N]
    # An id beyond a byte (vocab > 256) becomes 0xFF, never valid in UTF-8, so it prints as U+FFFD.
    generated = bytes(t if t < 256 else 0xFF for t in out[0].tolist())
    sys.stdout.write((prompt + generated).decode("utf-8", errors="replace") + "\n")
    return 0
