"""Which files a build writes: one Python module per model or top-level layer, named after it.
Output is built in memory first; `nlc build` writes it, `nlc diff` compares it."""

from __future__ import annotations

from pathlib import Path

from nlc.codegen import generate
from nlc.diagnostics import Diagnostic, SourceMap
from nlc.spec import load_spec


def build_outputs(paths: list[str], out_dir: str) -> tuple[dict[str, str], list[Diagnostic], SourceMap]:
    """{output path: source} for every declaration of every spec, or the diagnostics that stop it."""
    outputs: dict[str, str] = {}
    owners: dict[str, str] = {}
    diagnostics: list[Diagnostic] = []
    sources = SourceMap()
    for path in paths:
        spec, diags, srcs = load_spec(path)
        sources.texts.update(srcs.texts)
        if diags:
            diagnostics += diags
            continue
        for decl in spec.decls:
            target = str(Path(out_dir) / f"{decl.name}.py")
            if target in owners:
                raise ValueError(f"'{decl.name}' is declared in both {owners[target]} and {path}: both would be built into {target}")
            owners[target] = path
            outputs[target] = generate(spec, Path(path).as_posix(), decl.name)
    return outputs, diagnostics, sources
