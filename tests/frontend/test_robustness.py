"""Malformed input of every kind gives located diagnostics and exit code 1, never a traceback
(LANGUAGE.md §6), through `load_spec` and through `nlc check`."""

import random
from pathlib import Path

import pytest

from nlc.cli import main
from nlc.spec import load_spec
from nlc.syntax import parse

ROOT = Path(__file__).resolve().parents[2]
HOPE = (ROOT / "specs" / "hope.nl").read_bytes()
MB = 1024 * 1024


def assert_located(diagnostics, data: bytes, path: str) -> None:
    assert diagnostics, "a malformed input must be reported"
    lines = data.count(b"\n") + 1
    for d in diagnostics:
        assert d.code.startswith("E") and d.message
        assert d.span.path == path
        assert 1 <= d.span.line <= d.span.end_line <= lines
        assert d.span.column >= 1 and d.span.end_column >= 1


def assert_diagnosed(data: bytes, tmp_path: Path, capsys, as_text: bool = True) -> list:
    """Check `data` in memory (as bytes, and as text where it decodes) and from a file."""
    spec, diagnostics, _ = load_spec("in.nl", data)
    assert spec is None
    assert_located(diagnostics, data, "in.nl")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        if as_text:
            spec, from_text, _ = load_spec("in.nl", text)
            assert spec is None and from_text == diagnostics
    path = tmp_path / "in.nl"
    path.write_bytes(data)
    capsys.readouterr()
    assert main(["check", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert err.startswith(f"{path}:{diagnostics[0].span.line}:{diagnostics[0].span.column}: error[")
    return diagnostics


def codes(diagnostics) -> list[str]:
    return [d.code for d in diagnostics]


def test_binary_bytes(tmp_path, capsys):
    rng = random.Random(0)
    for _ in range(20):
        assert_diagnosed(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))), tmp_path, capsys)
    assert codes(assert_diagnosed(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", tmp_path, capsys)) == ["E001"]


@pytest.mark.parametrize("data", [b"\x00", b"model m {\x00}", b"model m {\n  dim = 1\x00\n}\n", b"\x00" * 1000])
def test_nul(data, tmp_path, capsys):
    assert codes(assert_diagnosed(data, tmp_path, capsys)) == ["E002"]


@pytest.mark.parametrize(
    ("data", "line", "column"),
    [(b"model m {\n  dim = 1 # \xff\xfe\n}\n", 2, 13), (b"\xc3", 1, 1), (b"model m {\xed\xa0\x80}", 1, 10), (b"mlp a { dim = 1 }\n" * 3 + b"\x80", 4, 1)],
)
def test_invalid_utf8(data, line, column, tmp_path, capsys):
    (d,) = assert_diagnosed(data, tmp_path, capsys)
    assert (d.code, d.span.line, d.span.column) == ("E001", line, column)


@pytest.mark.parametrize(
    ("text", "column", "hint"),
    [
        ("model m { \u0430 = 1 }", 11, "'a'"),  # Cyrillic a
        ("model m { dim \uff1d 1 }", 15, "'='"),  # fullwidth equals
        ("m\u043edel m { dim = 1 }", 2, "'o'"),  # Cyrillic o in a keyword
        ("model m { dim = \uff11 }", 17, "'1'"),  # fullwidth digit
        ("model m { dim = 1\u00a0}", 18, "' '"),  # no-break space
        ("model m { keys = linear \u2212> silu }", 25, "'-'"),  # minus sign
    ],
)
def test_homoglyphs_are_named_with_their_ascii_lookalike(text, column, hint, tmp_path, capsys):
    (d,) = assert_diagnosed(text.encode(), tmp_path, capsys)
    assert (d.code, d.span.line, d.span.column) == ("E002", 1, column)
    assert f"did you mean {hint}?" in d.message


def test_non_ascii_is_fine_in_comments_and_strings():
    spec, diagnostics, _ = load_spec(
        "in.nl",
        '## Modèle à mémoire — Ω\nmodel m {\n  dim = 64  # λ\n  depth = 1\n  block {\n    mlp ffn {}\n  }\n  train {\n    data = bytes("données.txt")\n  }\n}\n',
    )
    assert diagnostics == []
    assert spec.decls[0].doc == "Modèle à mémoire — Ω"
    assert spec.decls[0].train.data.path == "données.txt"


def test_every_prefix_of_a_catalogue_spec():
    """A truncated file: each proper prefix of hope.nl either checks or is reported, never raises."""
    accepted = 0
    for end in range(len(HOPE)):
        spec, diagnostics, _ = load_spec("in.nl", HOPE[:end])
        if spec is None:
            assert_located(diagnostics, HOPE[:end], "in.nl")
        else:
            accepted += 1
    assert accepted == 1  # only the file without its final newline is complete


def test_prefixes_through_the_cli(tmp_path, capsys):
    lines = HOPE.split(b"\n")
    for n in range(0, len(lines) - 2, 3):
        assert_diagnosed(b"\n".join(lines[:n]) + b"\n", tmp_path, capsys)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"model m { dim = 1 }  # " + b"x" * 5 * MB + b"\n", id="comment"),
        pytest.param(b"model m { dim = 1" + b" " * 5 * MB + b"}", id="spaces"),
        pytest.param(b"model m {" + b"@" * 5 * MB, id="garbage"),
        pytest.param(b"\xff" * 5 * MB, id="invalid-utf8"),
        pytest.param(b"model m { dim = 1 }  # " + "é".encode() * (5 * MB // 2) + b"\x00\n", id="nul-after-non-ascii"),
    ],
)
def test_a_5mb_line(data, tmp_path, capsys):
    assert_diagnosed(data, tmp_path, capsys, as_text=False)
    _, err = capsys.readouterr()
    assert len(err) < 2000  # the source line is cut to a window around the caret


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"model m { " + b"a" * 99_000 + b" = 1 }", id="name"),
        pytest.param(b'model m { x = "' + b"s" * 99_000 + b'" }', id="string"),
        pytest.param(b"model m { x = [" + b"1, " * 5_000 + b"] }", id="list"),
    ],
)
def test_a_long_line_of_tokens(data, tmp_path, capsys):
    """Lines just under the length limit, of costly tokens; bench/check_speed.py measures them."""
    assert_diagnosed(data, tmp_path, capsys, as_text=False)


@pytest.mark.parametrize(
    ("data", "line", "length"),
    [
        pytest.param(b"model m { x = [" + b"1, " * (5 * MB // 3) + b"] }", 1, 15 + 3 * (5 * MB // 3) + 3, id="numbers"),
        pytest.param(b"mlp a {}\n" * 3 + b"# " + b"x" * 100_000 + b"\r\n", 4, 100_002, id="comment"),
    ],
)
def test_a_line_over_the_limit_is_refused_before_parsing(data, line, length, tmp_path, capsys):
    (d,) = assert_diagnosed(data, tmp_path, capsys)
    assert (d.code, d.span.line, d.span.column) == ("E008", line, 100_001)
    assert d.message == f"line too long ({length} characters; at most 100000)"


def test_a_line_at_the_limit_is_read():
    line = "mlp a { x = 1 }  # "
    line += "c" * (100_000 - len(line))
    file = parse(line + "\r\n", "in.nl")  # the '\r' of CRLF is not counted
    assert file.comments[0].text == line[line.index("#") :]
    _, diagnostics, _ = load_spec("in.nl", (line + "\r\n") * 2 + "x" * 100_001)
    assert [(d.code, d.span.line) for d in diagnostics] == [("E008", 3)]


def test_diagnostics_of_a_long_name_are_short(tmp_path, capsys):
    path = tmp_path / "in.nl"
    path.write_bytes(b"model m {\n  dim = 64\n  depth = 1\n  " + b"a" * 99_000 + b" = 1\n  block {\n    mlp ffn {}\n  }\n}\n")
    assert main(["check", str(path)]) == 1
    assert len(capsys.readouterr().err) < 2000


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("model m { dim = " + "1" * 4301 + " }", id="number"),
        pytest.param("memory m { dim = 64; batch = " + "1" * 5000 + " tokens }", id="quantity"),
    ],
)
def test_a_huge_integer(text, tmp_path, capsys):
    (d,) = assert_diagnosed(text.encode(), tmp_path, capsys)
    assert d.code == "E204"


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"model m { x = " + b"[" * 10_000 + b"1" + b"]" * 10_000 + b" }", id="lists"),
        pytest.param(b"model m " + b"{" * 10_000 + b"}" * 10_000, id="braces"),
        pytest.param(b"model m { x = " + b"f(" * 10_000 + b"1" + b")" * 10_000 + b" }", id="calls"),
        pytest.param(b"model m {" + b"block {" * 10_000 + b"}" * 10_001, id="declarations"),
        pytest.param(b"[" * 10_000, id="unclosed"),
        pytest.param(b"}" * 10_000, id="closers"),
        pytest.param(b"model m { x = " + b"memory(" * 10_000, id="truncated-calls"),
    ],
)
def test_10000_levels_of_nesting(data, tmp_path, capsys):
    assert_diagnosed(data, tmp_path, capsys)


def test_nesting_error_points_at_the_first_bracket_too_deep(tmp_path, capsys):
    (d,) = assert_diagnosed(b"model m {\n  x = " + b"(" * 10_000, tmp_path, capsys)
    assert (d.code, d.span.line, d.span.column) == ("E005", 2, 7 + 63)


@pytest.mark.parametrize(
    "data",
    [b"", b"\n\n\n", b"   \t  ", b"# only a comment", b"# one\n## two\n\n# three\n", b"\r\n# crlf\r\n", b";"],
)
def test_nothing_declared(data, tmp_path, capsys):
    diagnostics = assert_diagnosed(data, tmp_path, capsys)
    assert codes(diagnostics) == (["E003"] if data == b";" else ["E007"])


def test_many_members_separated_by_newlines(tmp_path, capsys):
    data = b"model m {\n" + b"a = 1\n" * 500 + b"}\n"
    assert sorted(codes(assert_diagnosed(data, tmp_path, capsys))) == ["E202"] * 500 + ["E206"] * 2  # no dim, no block


def test_many_small_errors_are_all_reported(tmp_path, capsys):
    data = b"model m {\n  dim = 64\n  depth = 1\n  block {\n" + b"".join(b"    memory m%d { objective = x%d }\n" % (i, i) for i in range(300)) + b"  }\n}\n"
    diagnostics = assert_diagnosed(data, tmp_path, capsys)
    assert codes(diagnostics) == ["E201"] * 300
