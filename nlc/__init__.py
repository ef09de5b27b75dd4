"""nlc: a compiler for Nested Learning architectures.

From Python:

    import nlc
    model = nlc.load("specs/hope.nl")        # the file's model, as an nn.Module
    logits, state = model(tokens)            # tokens: [batch, time] int64
    source = nlc.compile("specs/hope.nl")    # the generated Python source
"""

from __future__ import annotations

import builtins
import os

__version__ = "0.1.0"

__all__ = ["__version__", "check", "compile", "load"]


def check(path: str):
    """The diagnostics of a spec file (empty when it is valid)."""
    from nlc.spec import load_spec

    return load_spec(path)[1]


def _spec(path: str):
    from nlc.diagnostics import NlcError, render_text
    from nlc.spec import load_spec

    spec, diagnostics, sources = load_spec(path)
    if diagnostics:
        error = NlcError(diagnostics)
        error.args = (render_text(diagnostics, sources),)
        raise error
    return spec


def compile(path: str, name: str | None = None) -> str:
    """The generated Python source of a declaration of the spec (the file's model by default)."""
    from nlc.codegen import generate

    spec = _spec(path)
    if spec.get(name) is None:
        raise KeyError(f"{path} declares no {name!r}" if name else f"{path} holds several declarations: name one")
    return generate(spec, path, name)


def load(path: str, name: str | None = None):
    """Build the declaration's module in memory (same code as `nlc build` writes): a model or a layer."""
    import sys
    import types

    from nlc.codegen import class_name, generate

    spec = _spec(path)
    decl = spec.get(name)
    if decl is None:
        raise KeyError(f"{path} declares no {name!r}" if name else f"{path} holds several declarations: name one")
    source = generate(spec, path, decl.name)  # what `compile` returns, from the spec already read
    module = types.ModuleType(f"nlc_generated_{decl.name}")
    module.__file__ = f"<nlc {path}>"
    sys.modules[module.__name__] = module
    exec(builtins.compile(source, module.__file__, "exec"), module.__dict__)
    built = getattr(module, class_name(decl))()
    if os.environ.get("NLC_DEBUG") == "1":
        debug_report(source, built)
    return built


def debug_report(source: str, module) -> None:
    """NLC_DEBUG=1: the generated source and the ops path each memory takes, on stderr."""
    import sys

    from nlc.runtime import MemoryLayer

    print(source, file=sys.stderr)
    for name, layer in module.named_modules():
        if isinstance(layer, MemoryLayer):
            paths = ", ".join(f"{memory}: {path}" for memory, path in layer.paths().items())
            print(f"nlc: {name or 'layer'}: {paths}", file=sys.stderr)
