"""nlc info: what a spec builds, level by level: parameters, in-context state, update
frequencies, forward FLOPs per token and the fast path each memory takes."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from nlc.cli.common import report, spec_paths
from nlc.spec import load_spec
from nlc.spec import schema as s


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE")
    p.add_argument("name", nargs="?", metavar="NAME", help="one declaration of the file (default: its model)")


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def state_elements(state) -> int:
    """Numbers held by an in-context state (tensors found anywhere inside it)."""
    import torch

    if state is None:
        return 0
    if isinstance(state, torch.Tensor):
        return state.numel()
    if dataclasses.is_dataclass(state):
        return sum(state_elements(getattr(state, f.name)) for f in dataclasses.fields(state))
    if isinstance(state, dict):
        return sum(state_elements(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_elements(v) for v in state)
    return 0


def frequency(layer) -> str:
    match layer:
        case s.Memory() if layer.every > 1:
            return f"every {layer.every} tokens"
        case s.Memory() if layer.batch > 1:
            return f"every token (mini-batches of {layer.batch})"
        case s.Memory():
            return "every token"
        case s.Attention():
            return "caches every token" if layer.window is None else f"caches the last {layer.window} tokens"
        case s.Cms():
            return ", ".join(f"{lv.name}: {'never' if lv.every == 0 else f'every {lv.every}'}" for lv in layer.levels)
    return "never (outer level only)"


def flops_per_token(layer, module, context: int) -> int:
    """Forward FLOPs per token, approximately: 2 per weight of every projection, plus the memory's
    own read and write (about 3 passes over its state), plus attention over half the context."""
    flops = 2 * count(module)
    if isinstance(layer, s.Memory):
        state = module.initial_state(1)
        flops += 6 * state_elements(state.memory.weights)
    if isinstance(layer, s.Attention):
        span = context // 2 if layer.window is None else min(layer.window, context)
        flops += 4 * span * layer.dim
    if isinstance(layer, s.Cms):
        flops += 4 * count(module)  # each level is read with fast weights and learns from its gradient
    return flops


def fast_path(module) -> str:
    """The paths of a memory layer's memories (its own first, then its adaptive projections'), else "-"."""
    if not hasattr(module, "paths"):
        return "-"
    return "; ".join(path if name == "memory" else f"{name}: {path}" for name, path in module.paths().items())


def fallback_notes(name: str, module) -> list[str]:
    """One line per memory of the layer that runs on the token-by-token oracle, with a change that would not."""
    if not hasattr(module, "fallback_advice"):
        return []
    return [
        f"{name if memory == 'memory' else f'{name} ({memory})'} runs on the token-by-token oracle{advice}"
        for memory, advice in module.fallback_advice().items()
    ]


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    import nlc

    (path,) = spec_paths([args.file])
    spec, diagnostics, sources = load_spec(path)
    if diagnostics:
        report(diagnostics, sources)
        return 1
    decl = spec.get(args.name)
    if decl is None:
        from nlc.cli import UsageError

        raise UsageError(f"'{path}' declares no '{args.name}'" if args.name else f"'{path}' holds several declarations: name one")
    module = nlc.load(path, decl.name)
    console = Console(width=None if sys.stdout.isatty() else 180)
    table = Table(title=f"{decl.decl} {decl.name} ({path})", title_justify="left")
    for column in ("layer", "kind", "parameters", "state / stream", "learns in context", "FLOPs / token", "fast path"):
        table.add_column(column, justify="right" if column in ("parameters", "state / stream", "FLOPs / token") else "left")
    total_flops, total_state, notes = 0, 0, []
    if isinstance(decl, s.Model):
        context = decl.context
        rows = []
        for i, block_name in enumerate(decl.layout):
            block_ir = next(b for b in decl.blocks if b.name == block_name)
            block = module.blocks[i]
            for layer in block_ir.layers:
                rows.append((f"blocks.{i}.{layer.name}", layer, getattr(block, layer.name)))
        embed = count(module.embed)
        table.add_row("embed (+ tied head)" if decl.tie else "embed", "embedding", f"{embed:,}", "0", "never", "-", "-")
        total_flops += 2 * decl.dim * decl.vocab
    else:
        context = 2048
        rows = [(decl.name, decl, module)]
    for name, layer, sub in rows:
        state = sub.initial_state(1)
        n_state = state_elements(state)
        grows = isinstance(layer, s.Attention) and layer.window is None
        flops = flops_per_token(layer, sub, context)
        total_flops += flops
        total_state += n_state
        state_text = f"{2 * layer.dim:,} / token" if grows else f"{n_state:,}"
        table.add_row(name, layer.decl, f"{count(sub):,}", state_text, frequency(layer), f"{flops:,}", fast_path(sub))
        notes += fallback_notes(name, sub)
    console.print(table)
    for note in notes:
        console.print(f"note: {note}", markup=False, highlight=False)
    console.print(f"parameters: {count(module):,}   fixed in-context state per stream: {total_state:,} numbers   forward FLOPs per token: ~{total_flops:,}")
    if isinstance(decl, s.Model):
        t = decl.train
        console.print(f"outer level: {t.update.kind}, every step; {t.steps} steps of {t.batch} x {decl.context} tokens")
        for level in t.levels:
            console.print(f"  level {level.name}: {', '.join(level.params)} every {level.every} steps with {(level.update or t.update).kind}")
    return 0
