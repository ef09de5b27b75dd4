"""Train levels whose glob patterns match nothing or overlap are reported at their place in the spec."""

from __future__ import annotations

import pytest

from nlc.cli import main

SPEC = """model m {{
  dim = 16
  heads = 1
  depth = 1
  context = 8
  block {{ mlp ffn {{}} }}
  train {{
    steps = 1
    batch = 1
    data = bytes("data.txt")
    level slow {{ params = [{slow}]; every = 2 steps }}
    level fast {{ params = [{fast}]; every = 1 step }}
  }}
}}
"""


@pytest.mark.parametrize(
    ("slow", "fast", "expected"),
    [
        (
            '"*.ffn.nothing"',
            '"*.ffn.down.*"',
            "m.nl:11:28: error[E302]: level 'slow': pattern '*.ffn.nothing' matches no parameter\n"
            '    11 |     level slow { params = ["*.ffn.nothing"]; every = 2 steps }\n'
            "       |                            ^^^^^^^^^^^^^^^\n",
        ),
        (
            '"*.ffn.up.*"',
            '"*.ffn.*"',
            "m.nl:12:28: error[E207]: parameter 'blocks.0.ffn.up.weight' is claimed by level 'slow' (pattern '*.ffn.up.*') and by level 'fast' (pattern '*.ffn.*')\n"
            '    12 |     level fast { params = ["*.ffn.*"]; every = 1 step }\n'
            "       |                            ^^^^^^^^^\n",
        ),
    ],
    ids=["matches-nothing", "overlap"],
)
def test_level_pattern_errors_are_located(tmp_path, monkeypatch, capsys, slow, fast, expected):
    (tmp_path / "m.nl").write_text(SPEC.format(slow=slow, fast=fast))
    (tmp_path / "data.txt").write_text("hello world, " * 50)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "m.nl", "--out", "out", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(expected)
    assert not (tmp_path / "out" / "checkpoint.safetensors").exists()
