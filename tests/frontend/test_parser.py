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


def test_doc_comment_of_a_one_line_declaration_is_not_its_fields_doc():
    decl = parse("## The feed-forward layer.\nmlp ffn { dim = 64; act = gelu }\n", "x.nl").decls[0]
    assert decl.doc == ["The feed-forward layer."]
    assert [f.doc for f in decl.fields] == [[], []]


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


def test_bare_mlp_structure_means_all_defaults():
    spec, diagnostics, _ = load_spec("x.nl", "memory m {\n  dim = 64\n  structure = mlp\n}\n")
    assert diagnostics == []
    assert spec.decls[0].structure == load_spec("x.nl", "memory m {\n  dim = 64\n  structure = mlp()\n}\n")[0].decls[0].structure


RESERVED = ["model", "block", "memory", "attention", "mlp", "cms", "level", "train", "use", "extends", "true", "false", "none"]


@pytest.mark.parametrize("word", RESERVED)
def test_reserved_words_are_not_field_names(word):
    code, span, message = error_of(f"model m {{\n  {word} = 3\n}}\n")
    assert code == "E003"
    assert span == Span("x.nl", 2, 3, 2, 3 + len(word))
    assert message == f"'{word}' is a reserved word and cannot be a field name"


@pytest.mark.parametrize(("text", "word"), [("model cms {}", "cms"), ("memory model {}", "model"), ("block block {}", "block"), ("mlp true {}", "true")])
def test_reserved_words_are_not_declaration_names(text, word):
    code, span, message = error_of(f"mlp ok {{}}\n{text}\n")
    assert (code, span) == ("E003", Span("x.nl", 2, text.index(word, len(text.split()[0])) + 1, 2, text.index(word, len(text.split()[0])) + 1 + len(word)))
    assert message == f"'{word}' is a reserved word and cannot name a declaration"


def test_every_reserved_name_is_reported():
    with pytest.raises(NlcError) as info:
        parse("model cms {\n  none = 1\n  block {\n    mlp level {}\n  }\n}\n", "x.nl")
    assert [(d.span.line, d.message.split("'")[1]) for d in info.value.diagnostics] == [(1, "cms"), (2, "none"), (4, "level")]


@pytest.mark.parametrize("word", ["memory", "mlp"])
def test_memory_and_mlp_are_keyword_argument_names(word):
    call = fields_of(f"train {{ update = deep_momentum(lr: 0.01, {word}: mlp(depth: 2)) }}")["update"]
    assert [a.name for a in call.args] == ["lr", word]
    assert isinstance(call.args[1].value, ast.Call) and call.args[1].value.name == "mlp"


@pytest.mark.parametrize("word", ["memory", "mlp"])
def test_memory_and_mlp_are_bare_names_in_expressions(word):
    values = fields_of(f"memory m {{ a = {word}; b = [{word}, x]; c = f({word}) -> {word} }}")
    assert values["a"] == ast.Name(word, Span("x.nl", 1, 16, 1, 16 + len(word)))
    assert [i.name for i in values["b"].items] == [word, "x"]
    assert [type(t).__name__ for t in values["c"].terms] == ["Call", "Name"]


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


@pytest.mark.parametrize("text", ["memroy mix {}", "memroy {}", "memroy mix extends base {}", "memroy extends base {}"])
def test_misspelt_kind_inside_a_block_is_named(text):
    code, span, message = error_of(f"model m {{\n  block {{\n    {text}\n  }}\n}}\n")
    assert (code, span) == ("E003", Span("x.nl", 3, 5, 3, 11))
    assert message == "unknown declaration kind 'memroy'; did you mean 'memory'?"


def test_a_field_missing_its_equals_is_still_named():
    code, span, message = error_of("model m {\n  dim width\n}\n")
    assert (code, span.start, message) == ("E003", (2, 7), "expected '=' after the field name, found 'width'")


def test_stray_closing_brace_message():
    code, span, message = error_of("model m {\n  dim = 1\n}\n}\n")
    assert (code, span) == ("E003", Span("x.nl", 4, 1, 4, 2))
    assert message == "unexpected '}'; expected a declaration or the end of the file"


def test_no_expected_list_is_cut_short():
    """In every state of the parser, each terminal it accepts is named, alone or in its group."""
    from nlc.syntax.parser import KINDS, TERMINAL_DISPLAY, VALUE_STARTS, _parser, describe

    def named_as(t: str) -> list[str]:
        groups = [("a declaration", t.lower() in KINDS), ("a value", t in VALUE_STARTS), ("the end of the file", t == "USE")]
        return [TERMINAL_DISPLAY[t]] + [group for group, member in groups if member]

    for actions in _parser().parser.parser.parser.parse_table.states.values():
        accepted = {t for t in actions if t.isupper() or t == "$END"}
        text = describe(accepted)
        for t in accepted:
            assert any(name in text for name in named_as(t)), (t, text)


@pytest.mark.parametrize(
    ("text", "what"),
    [
        ("model m { block { mlp a {} mlp b {} } }", "two declarations"),
        ("model m { dim = 1 depth = 2 }", "two fields"),
        ("model m { dim = 1 block {} }", "a field and a declaration"),
    ],
)
def test_two_members_on_one_line_are_named(text, what):
    _, _, message = error_of(text)
    assert message == f"{what} on one line need a ';' between them"


def test_many_separators_on_one_line():
    model = parse("model m { " + "a = 1; " * 2000 + "}", "x.nl").decls[0]
    assert len(model.fields) == 2000
    code, span, _ = error_of("model m { " + "a = 1; " * 1000 + "b = 2 c = 3 }")
    assert (code, span.column) == ("E006", 11 + 7 * 1000 + 6)


def test_doc_comments_with_nested_members_on_one_line():
    model = parse("## the model\nmodel m { block {\n  ## the layer\n  mlp ffn { dim = 1 }; x = 2 } }\n", "x.nl").decls[0]
    block = model.decls[0]
    assert (model.doc, block.doc, block.decls[0].doc, block.decls[0].fields[0].doc, block.fields[0].doc) == (["the model"], [], ["the layer"], [], [])


@pytest.mark.parametrize(
    "text",
    [
        "model m { dim = " + "1" * 4301 + " }",
        "memory m { batch = " + "1" * 5000 + " tokens }",
        "model m { dim = -" + "1_" * 4400 + "1 }",
        "model m { dim = " + "9" * 309 + " }",
    ],
)
def test_an_integer_beyond_the_float_range_is_refused(text):
    code, span, message = error_of(text)
    assert code == "E204" and message.startswith("number too large (")
    assert (span.line, span.column) == (1, text.index("=") + 3)


def test_the_largest_integers_within_the_float_range_are_read():
    assert fields_of("mlp m { x = 1" + "0" * 308 + "; y = -1" + "0" * 308 + " }")["y"].value == -(10**308)
