"""The formatter: canonical output, comments kept, idempotence, meaning preserved."""

from pathlib import Path

import pytest

from nlc.diagnostics import NlcError
from nlc.spec import load_spec
from nlc.syntax import parse
from nlc.syntax.format import format_file

ROOT = Path(__file__).resolve().parents[2]
CATALOGUE = sorted((ROOT / "specs").glob("*.nl"))
GOLDEN_INPUTS = sorted((ROOT / "tests" / "golden").glob("*/*.nl"))


def fmt(text: str) -> str:
    return format_file(parse(text, "x.nl"))


def ir(text: str) -> dict:
    spec, diagnostics, _ = load_spec("x.nl", text)
    assert diagnostics == []
    return spec.model_dump(exclude={"path", "sha256"})


MESSY = """\


# The header comment.
## Doc of the model.
model   m{
dim=128;depth =  3   # trailing on depth
heads=4


    ## doc of layout
layout=[ a,b , a ]
  block a{memory mix{keys=linear->conv( 4 )->l2norm;update=momentum( lr:gate , beta : 0.9 , )}
  mlp ffn{ }}
block b {
      # an own-line comment inside b
      attention attn { window = 64 ; rope=false }   }
}   # after the model
"""

CANONICAL = """\
# The header comment.
## Doc of the model.
model m {
  dim = 128
  depth = 3  # trailing on depth
  heads = 4

  ## doc of layout
  layout = [a, b, a]
  block a {
    memory mix {
      keys = linear -> conv(4) -> l2norm
      update = momentum(lr: gate, beta: 0.9)
    }
    mlp ffn {}
  }
  block b {
    # an own-line comment inside b
    attention attn {
      window = 64
      rope = false
    }
  }
}  # after the model
"""


def test_messy_input_gets_the_canonical_form():
    assert fmt(MESSY) == CANONICAL


def test_canonical_form_is_a_fixed_point():
    assert fmt(CANONICAL) == CANONICAL


def test_formatting_keeps_the_meaning():
    assert ir(fmt(MESSY)) == ir(MESSY)


@pytest.mark.parametrize("path", CATALOGUE, ids=lambda p: p.name)
def test_catalogue_specs_are_canonical(path):
    text = path.read_text(encoding="utf-8")
    assert fmt(text) == text


def parseable_golden_inputs() -> list[Path]:
    out = []
    for path in GOLDEN_INPUTS:
        try:
            parse(path.read_bytes(), "x.nl")
        except NlcError:
            continue
        out.append(path)
    return out


@pytest.mark.parametrize("path", parseable_golden_inputs(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_idempotent_and_comments_kept_on_every_golden_input(path):
    text = path.read_text(encoding="utf-8")
    once = fmt(text)
    assert fmt(once) == once
    assert [c.text.rstrip() for c in parse(once, "x.nl").comments] == [c.text.rstrip() for c in parse(text, "x.nl").comments]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("mlp a { dim = 1 }  # c\n", "mlp a {\n  dim = 1  # c\n}\n"),
        ("mlp a {} # c\nmlp b {}\n", "mlp a {}  # c\nmlp b {}\n"),
        ("mlp a {\n  dim = 1\n  # last words\n}\n", "mlp a {\n  dim = 1\n  # last words\n}\n"),
        ("\n\n\nmlp a {\n\n\n  dim = 1\n\n\n\n  expand = 2\n\n}\n\n\n", "mlp a {\n  dim = 1\n\n  expand = 2\n}\n"),
        ("mlp a { dim = 1 }\n# between\n\n\nmlp b { dim = 1 }\n", "mlp a {\n  dim = 1\n}\n# between\n\nmlp b {\n  dim = 1\n}\n"),
        ('use "a.nl"   # base\nuse "b.nl"\nmlp a {}\n', 'use "a.nl"  # base\nuse "b.nl"\nmlp a {}\n'),
        ("mlp a {\r\n  dim = 1  # crlf\r\n}\r\n", "mlp a {\n  dim = 1  # crlf\n}\n"),
        ("mlp a { x = 1_000; y = 3e-4; z = .5; b = 16   tokens }", "mlp a {\n  x = 1_000\n  y = 3e-4\n  z = .5\n  b = 16 tokens\n}\n"),
        ('mlp a { p = "q\\"uote" }', 'mlp a {\n  p = "q\\"uote"\n}\n'),
    ],
)
def test_small_cases(source, expected):
    assert fmt(source) == expected
    assert fmt(expected) == expected


def test_a_comment_inside_an_expression_is_kept():
    text = "model m {\n  layout = [\n    a,  # first\n    b,\n  ]\n  dim = 1\n}\n"
    out = fmt(text)
    assert "# first" in out
    assert fmt(out) == out


def test_declaration_holding_only_a_comment():
    text = "model m {\n  dim = 8\n  depth = 1\n  block {\n    mlp ffn {\n      # defaults only\n    }\n  }\n}\n"
    assert fmt(text) == text
