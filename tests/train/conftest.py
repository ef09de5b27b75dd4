"""Fixtures for the training tests: tiny specs written into the test's folder, one intra-op thread."""

from pathlib import Path

import pytest

MIXERS = {
    "attention": "attention attn { rope = true }\n    mlp ffn {}",
    "deltanet": "memory mix {}\n    mlp ffn {}",
    "cms": (
        "attention attn { rope = true }\n    cms continuum {\n      objective = task\n"
        "      level fast { structure = mlp(act: gelu, expand: 2); every = 8 tokens }\n"
        "      level slow { structure = mlp(act: gelu, expand: 2); every = 16 tokens }\n    }"
    ),
}


def write_spec(folder: Path, mixer: str = "attention", train: str = "", vocab: int = 256, name: str | None = None, update: str = "adamw(lr: 3e-3)") -> Path:
    """A model of dim 32, depth 1, context 32 with the given block, outer optimiser and extra `train` fields."""
    name = name or f"tiny_{mixer}"
    path = folder / f"{name}.nl"
    block = MIXERS[mixer]
    path.write_text(
        f"model {name} {{\n  vocab = {vocab}\n  dim = 32\n  depth = 1\n  heads = 2\n  context = 32\n"
        f"  block {{\n    {block}\n  }}\n"
        f"  train {{\n    update = {update}\n    schedule = cosine(warmup: 2)\n    batch = 4\n    steps = 12\n"
        f"    eval_every = 6\n    {train}\n  }}\n}}\n",
        encoding="utf-8",
    )
    return path


@pytest.fixture
def spec(tmp_path):
    return lambda *args, **kwargs: write_spec(tmp_path, *args, **kwargs)
