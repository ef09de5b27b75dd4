"""`nlc info`: the table of a spec's layers with the path that computes each memory, and a note for every memory
that runs on the token-by-token oracle, naming a change that has a fast path."""

from pathlib import Path

import pytest

from nlc.cli import main

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.filterwarnings("ignore:no fast path supports")


def info(path, capsys) -> str:
    assert main(["info", str(path)]) == 0
    return capsys.readouterr().out


def test_a_catalogue_model_lists_its_layers_and_their_paths(capsys):
    out = info(ROOT / "specs/omeganet.nl", capsys)
    for block in range(4):
        assert f"blocks.{block}.mix" in out
    assert out.count("matrix.scaled_chunk") == 4
    assert "parameters:" in out and "outer level: adamw" in out
    assert "note:" not in out


def test_adaptive_projections_are_listed_with_their_paths(capsys):
    out = info(ROOT / "specs/hope.nl", capsys)
    assert "key: network.chunk" in out and "value:" in out


def test_a_memory_on_the_oracle_gets_a_note_with_a_change_that_has_a_fast_path(tmp_path, capsys):
    spec = tmp_path / "deep.nl"
    spec.write_text("memory deepmem {\n  dim = 32\n  heads = 2\n  structure = mlp(depth: 2, expand: 2)\n}\n")
    out = info(spec, capsys)
    assert "naive (fallback)" in out
    assert "note: deepmem runs on the token-by-token oracle; with batch = 16 tokens (mini-batches, as in TTT) it would run on network.chunk" in out
