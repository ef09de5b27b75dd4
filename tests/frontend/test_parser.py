"""The parser: spans, documentation comments, comments, reserved words, quantities, separators."""

import pytest

from nlc.diagnostics import NlcError, Span
from nlc.spec import load_spec
from nlc.syntax import ast, parse


def error_of(text: str) -> tuple[str, Span, str]:
    with pytest.raises(NlcError) as info:
        parse(text, "x.nl")
    d = info.value.diagnostics[0]
    return d.code, d.span, d.message


def fields_of(text: str) -> dict[str, ast.Expr]:
    decl = parse(text, "x.nl").decls[0]
    return {f.name: f.value for f in decl.fields}


def test_spans_of_declarations_fields_and_values():
    text = "model m {\n  dim = 128\n  block {\n    memory mix { objective = lp(3) }\n  }\n}\n"
    file = parse(text, "x.nl")
    (model,) = file.decls
    assert model.span == Span("x.nl", 1, 1, 6, 2)
    assert model.kind_span == Span("x.nl", 1, 1, 1, 6)
    assert model.name_span == Span("x.nl", 1, 7, 1, 8)
    (dim,) = model.fields
    assert (dim.span, dim.name_span) == (Span("x.nl", 2, 3, 2, 12), Span("x.nl", 2, 3, 2, 6))
    assert dim.value == ast.Number(128, "128", Span("x.nl", 2, 9, 2, 12))
    memory = model.decls[0].decls[0]
    assert (memory.kind, memory.name, memory.span) == ("memory", "mix", Span("x.nl", 4, 5, 4, 37))
    call = memory.fields[0].value
    assert isinstance(call, ast.Call)
    assert (call.span, call.name_span) == (Span("x.nl", 4, 30, 4, 35), Span("x.nl", 4, 30, 4, 32))
    assert call.args[0].value.span == Span("x.nl", 4, 33, 4, 34)


def test_span_columns_index_characters_not_bytes():
    # Non-ASCII text in a comment before the field must not shift the columns after it.
    file = parse("model m { # évolué\n  dim = 1 }\n", "x.nl")
    assert file.decls[0].fields[0].value.span == Span("x.nl", 2, 9, 2, 10)
    assert parse('mlp m { x = "é"; dim = 1 }', "x.nl").decls[0].fields[1].span.column == 18


def test_extends_span():
    decl = parse("model small extends base { dim = 1 }", "x.nl").decls[0]
    assert (decl.extends, decl.extends_span) == ("base", Span("x.nl", 1, 21, 1, 25))


def test_doc_comments_attach_to_the_next_declaration_or_field():
    text = "# not a doc\n## Doc line one\n## line two\nmodel m {\n  ## width\n  dim = 1\n  # plain\n  depth = 2\n  ## detached\n\n  heads = 1\n}\n"
    model = parse(text, "x.nl").decls[0]
    assert model.doc == ["Doc line one", "line two"]
    docs = {f.name: f.doc for f in model.fields}
    assert docs == {"dim": ["width"], "depth": [], "heads": []}


@pytest.mark.xfail(strict=True, reason="attach_docs gives a declaration's doc comment to every field on the declaration's first line too")
def test_doc_comment_of_a_one_line_declaration_is_not_its_fields_doc():
    decl = parse("## The feed-forward layer.\nmlp ffn { dim = 64; act = gelu }\n", "x.nl").decls[0]
    assert decl.doc == ["The feed-forward layer."]
    assert [f.doc for f in decl.fields] == [[], []]


@pytest.mark.xfail(strict=True, reason="attach_docs gives a field's doc comment to every member starting on the line below it, so formatting changes the IR")
def test_doc_comment_belongs_to_the_first_member_below_it():
    decl = parse("mlp ffn {\n  ## the width\n  dim = 64; act = gelu\n}\n", "x.nl").decls[0]
    assert [f.doc for f in decl.fields] == [["the width"], []]


def test_doc_comment_of_a_nested_declaration():
    model = parse("model m {\n  block {\n    ## the mixer\n    memory mix {}\n  }\n}\n", "x.nl").decls[0]
    assert model.decls[0].decls[0].doc == ["the mixer"]


def test_every_comment_is_collected_with_its_span():
    text = '# one\nuse "a.nl"  # two\nmodel m {  # three\n  x = f(1,  # four\n        2)\n}\n## five\n'
    comments = parse(text, "x.nl").comments
    assert [c.text for c in comments] == ["# one", "# two", "# three", "# four", "## five"]
    assert comments[3].span == Span("x.nl", 4, 13, 4, 19)
    assert [c.is_doc for c in comments] == [False, False, False, False, True]


def test_a_hash_inside_a_string_is_not_a_comment():
    file = parse('model m { data = bytes("a#b.txt") }  # c\n', "x.nl")
    assert [c.text for c in file.comments] == ["# c"]
    assert file.decls[0].fields[0].value.args[0].value.value == "a#b.txt"


def test_comments_do_not_leak_between_parses():
    parse("mlp a {}  # first\n", "a.nl")
    assert [c.text for c in parse("mlp b {}\n", "b.nl").comments] == []


@pytest.mark.parametrize("callee", ["memory", "mlp"])
def test_memory_and_mlp_are_call_names_inside_expressions(callee):
    value = fields_of(f"memory m {{ keys = {callee}(mlp(depth: 2)) -> conv(4) }}")["keys"]
    assert isinstance(value, ast.Pipeline)
    head = value.terms[0]
    assert isinstance(head, ast.Call) and head.name == callee
    assert head.args[0].value.name == "mlp"


@pytest.mark.xfail(strict=True, reason="a bare `mlp` value (all defaults, like `linear` or `gate`) fails with \"unexpected '}'; expected '('\"")
def test_bare_mlp_structure_means_all_defaults():
    spec, diagnostics, _ = load_spec("x.nl", "memory m {\n  dim = 64\n  structure = mlp\n}\n")
    assert diagnostics == []
    assert spec.decls[0].structure == load_spec("x.nl", "memory m {\n  dim = 64\n  structure = mlp()\n}\n")[0].decls[0].structure


LITERAL_WORDS = ["use", "extends", "true", "false", "none"]


@pytest.mark.parametrize(
    "word",
    [
        *["model", "block", "memory", "attention", "mlp", "cms", "level", "train"],
        *[pytest.param(w, marks=pytest.mark.xfail(strict=True, reason=f"'{w} = 3' parses as a field (reserved in LANGUAGE.md §1)")) for w in LITERAL_WORDS],
    ],
)
def test_reserved_words_are_not_field_names(word):
    code, span, message = error_of(f"model m {{\n  {word} = 3\n}}\n")
    assert code == "E003"
    assert span == Span("x.nl", 2, 3, 2, 3 + len(word))
    assert "reserved word" in message


def test_units_are_not_reserved():
    values = fields_of("train { steps = 2000; tokens = 3; token = 1; step = 2 }")
    assert {k: v.value for k, v in values.items()} == {"steps": 2000, "tokens": 3, "token": 1, "step": 2}


@pytest.mark.parametrize(
    ("text", "value", "unit"),
    [
        ("16 tokens", 16, "tokens"),
        ("1 token", 1, "token"),
        ("8 steps", 8, "steps"),
        ("1 step", 1, "step"),
        ("1_024\ttokens", 1024, "tokens"),
        ("2.5 steps", 2.5, "steps"),
    ],
)
def test_quantities(text, value, unit):
    v = fields_of(f"memory m {{ batch = {text} }}")["batch"]
    assert isinstance(v, ast.Quantity)
    assert (v.value, v.unit) == (value, unit)


@pytest.mark.parametrize(("text", "value"), [("3", 3), ("0.5", 0.5), ("3e-4", 3e-4), ("1_000", 1000), ("-2", -2), (".5", 0.5), ("1E3", 1000.0)])
def test_plain_numbers(text, value):
    v = fields_of(f"mlp m {{ x = {text} }}")["x"]
    assert isinstance(v, ast.Number)
    assert v.value == value and type(v.value) is type(value)
    assert v.text == text


def test_a_unit_on_the_next_line_is_not_part_of_a_quantity():
    values = fields_of("memory m {\n  batch = 16\n  tokens = 2\n}")
    assert isinstance(values["batch"], ast.Number)
    assert set(values) == {"batch", "tokens"}


def test_a_unit_must_be_a_whole_word():
    code, span, _ = error_of("memory m { batch = 16 tokensx = 2 }")
    assert (code, span.column) == ("E006", 23)


def test_semicolons_separate_members_on_one_line():
    model = parse("model m { dim = 1; depth = 2;; block { mlp a {}; mlp b {} }; }", "x.nl").decls[0]
    assert [f.name for f in model.fields] == ["dim", "depth"]
    assert [d.name for d in model.decls[0].decls] == ["a", "b"]


def test_newlines_separate_members():
    model = parse("model m {\n  dim = 1\n  depth = 2\n}", "x.nl").decls[0]
    assert [f.name for f in model.fields] == ["dim", "depth"]


@pytest.mark.parametrize(
    ("text", "column"),
    [("model m { dim = 1 depth = 2 }", 19), ("model m { block { mlp a {} mlp b {} } }", 28), ("model m { dim = 1; depth = 2 heads = 1 }", 30)],
)
def test_two_members_on_one_line_without_a_separator(text, column):
    code, span, _ = error_of(text)
    assert (code, span.line, span.column) == ("E006", 1, column)


def test_pipelines_lists_and_keyword_arguments():
    values = fields_of('model m { x = a -> f(1, k: [2, "s"], ) -> b; y = [] ; z = [1,]; t = true; f = false; n = none }')
    x = values["x"]
    assert isinstance(x, ast.Pipeline) and [type(t).__name__ for t in x.terms] == ["Name", "Call", "Name"]
    call = x.terms[1]
    assert [a.name for a in call.args] == [None, "k"]
    assert isinstance(call.args[1].value, ast.ListExpr)
    assert values["y"].items == [] and len(values["z"].items) == 1
    assert [values[k].value for k in "tfn"] == [True, False, None]


def test_uses_and_their_paths():
    file = parse('use "base.nl"\nuse "dir/other \\"q\\".nl"\nmlp m {}\n', "x.nl")
    assert [u.path for u in file.uses] == ["base.nl", 'dir/other "q".nl']
    assert file.uses[0].path_span == Span("x.nl", 1, 5, 1, 14)


def test_bytes_input_is_decoded_as_utf8():
    file = parse("mlp m { dim = 1 }  # ünïcode\n".encode(), "x.nl")
    assert file.comments[0].text == "# ünïcode"


def test_crlf_line_endings():
    file = parse("model m {\r\n  dim = 1\r\n  depth = 2\r\n}\r\n", "x.nl")
    assert [(f.name, f.span.line) for f in file.decls[0].fields] == [("dim", 2), ("depth", 3)]


def test_nesting_at_the_limit_parses():
    from nlc.syntax.parser import MAX_DEPTH

    inner = "[" * (MAX_DEPTH - 1) + "1" + "]" * (MAX_DEPTH - 1)
    parse(f"model m {{ x = {inner} }}", "x.nl")
    code, _, _ = error_of(f"model m {{ x = [{inner}] }}")
    assert code == "E005"


def test_brackets_in_strings_and_comments_do_not_count_towards_nesting():
    parse('model m { x = "' + "[" * 200 + '" }  # ' + "{" * 200 + "\n", "x.nl")


@pytest.mark.xfail(strict=True, reason="a misspelt declaration kind inside a block is reported as a field missing '=' at the name after it")
def test_misspelt_kind_inside_a_block_is_named():
    code, span, message = error_of("model m {\n  block {\n    memroy mix {}\n  }\n}\n")
    assert (code, span) == ("E003", Span("x.nl", 3, 5, 3, 11))
    assert "did you mean 'memory'" in message


@pytest.mark.xfail(strict=True, reason="a stray '}' at the top level lists six alphabetically first kinds, not 'model' nor the end of the file")
def test_stray_closing_brace_message():
    code, span, message = error_of("model m {\n  dim = 1\n}\n}\n")
    assert (code, span) == ("E003", Span("x.nl", 4, 1, 4, 2))
    assert "'model'" in message or "no '{'" in message


@pytest.mark.xfail(strict=True, reason="E006 calls two declarations on one line 'two fields'")
def test_two_declarations_on_one_line_are_not_called_fields():
    _, _, message = error_of("model m { block { mlp a {} mlp b {} } }")
    assert "fields" not in message


@pytest.mark.xfail(
    strict=True, reason="reserved words are accepted as declaration names (`model cms`, `memory model`); specs/README.md says a model cannot be named cms"
)
def test_reserved_words_are_not_declaration_names():
    code, _, message = error_of("model cms {\n  dim = 1\n}\n")
    assert code == "E003" and "reserved word" in message
