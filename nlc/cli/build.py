"""nlc build: compile specs into Python modules (one per model or top-level layer)."""

from __future__ import annotations

import argparse
from pathlib import Path

from nlc.cli.common import add_build_arguments, generated_modules
from nlc.fsutil import write_atomic


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_build_arguments(p, "output directory")


def run(args: argparse.Namespace) -> int:
    outputs = generated_modules(args.files, args.out)
    if outputs is None:
        return 1
    for path, text in outputs.items():
        target = Path(path)
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            write_atomic(target, text)  # only when changed: mtimes stay put
        print(f"built {path}")
    return 0
