"""What diagnostics say: one per mistake, in plain words, never a bad value let through.
(The exact text of each error code is pinned by the goldens in tests/golden.)"""

import pytest

from nlc.diagnostics import Diagnostic, SourceMap, Span, render_text
from nlc.spec import load_spec


def model(body: str = "    memory mix {}", fields: str = "") -> str:
    return f"model m {{\n  dim = 64\n  depth = 2\n  heads = 4\n{fields}  block {{\n{body}\n  }}\n}}\n"


def diagnose(text: str) -> list:
    spec, diagnostics, _ = load_spec("x.nl", text)
    assert (spec is None) == bool(diagnostics)
    return diagnostics


def test_the_model_helper_is_valid():
    assert diagnose(model()) == []


def test_render_text_layout():
    d = diagnose(model("    memory mix {\n      objective = l3\n    }"))
    _, _, sources = load_spec("x.nl", model("    memory mix {\n      objective = l3\n    }"))
    assert render_text(d, sources) == (
        "x.nl:7:19: error[E201]: unknown objective 'l3'; did you mean 'l2'?\n"
        "    7 |       objective = l3\n"
        "      |                   ^^\n"
        "    = expected 'dot', 'l2', 'lp' or 'huber'\n"
    )


def test_render_text_of_a_span_past_the_end_of_its_line_and_without_source():
    diagnostics = [Diagnostic("E004", "m", Span("a.nl", 1, 4, 1, 4)), Diagnostic("E007", "m", Span("gone.nl", 3, 1, 3, 1), notes=("n",))]
    text = render_text(diagnostics, SourceMap({"a.nl": "abc"}))
    assert text == "a.nl:1:4: error[E004]: m\n    1 | abc\n      |    ^\ngone.nl:3:1: error[E007]: m\n    = n\n"


def test_a_long_source_line_is_shown_around_the_caret():
    line = "  x = [" + "1, " * 200 + "@"
    _, diagnostics, sources = load_spec("x.nl", "model m {\n" + line + "\n}\n")
    shown = render_text(diagnostics, sources).splitlines()
    assert shown[0].startswith(f"x.nl:2:{len(line)}: error[E002]")
    assert shown[1].startswith("    2 | …") and shown[1].endswith("@")
    assert shown[2].endswith("^") and len(shown[2]) == len(shown[1])


def test_several_mistakes_are_all_reported_in_source_order():
    d = diagnose(model("    memory mix {\n      objective = l3\n      batch = 16\n    }\n    mlp ffn { act = swish }", fields="  heds = 4\n"))
    assert [(x.code, x.span.line) for x in d] == [("E202", 5), ("E201", 8), ("E208", 9), ("E201", 11)]


def test_a_bad_depth_is_reported_once():
    d = diagnose(model().replace("depth = 2", "depth = 2.5"))
    assert [x.code for x in d] == ["E204"]


def test_indivisible_heads_are_reported_once():
    d = diagnose(model("    memory mix {}\n    attention attn {}").replace("heads = 4", "heads = 3"))
    assert [(x.code, x.span.line) for x in d] == [("E401", 4)]


def test_an_extends_cycle_is_reported_once():
    d = diagnose("memory a extends b {\n  dim = 64\n}\n\nmemory b extends a {\n  dim = 64\n}\n")
    assert [x.code for x in d] == ["E303"]


def test_an_empty_layout_is_reported_once():
    d = diagnose(model().replace("  depth = 2\n", "  layout = []\n"))
    assert [x.code for x in d] == ["E206"]
    assert "depth" not in d[0].message


def test_a_misplaced_declaration_is_reported_once():
    d = diagnose(model("    model inner {}"))
    assert [x.code for x in d] == ["E209"]


def test_articles():
    (d,) = diagnose("memory fast {\n  dim = 64\n}\n\nattention slow extends fast {\n  dim = 64\n}\n")
    assert d.message.startswith("an attention cannot extend the memory 'fast'")


def test_a_field_in_a_block_says_blocks_have_no_fields():
    (d,) = diagnose(model("    dim = 32\n    memory mix {}"))
    assert d.code == "E202"
    assert "layers" not in d.message + " ".join(d.notes)


def test_a_cms_without_levels_asks_for_a_level():
    (d,) = diagnose(model("    cms continuum {}"))
    assert d.code == "E206"
    assert "level NAME" in d.message + " ".join(d.notes)


def test_a_value_where_a_list_is_needed_is_shown_in_brackets():
    (d,) = diagnose(model(fields='  train {\n    level slow { params = "*.ffn.*"; every = 2 steps }\n  }\n'))
    assert d.code == "E204"
    assert d.notes == ('write it as ["*.ffn.*"]',)


def test_a_control_character_gets_no_lookalike_hint():
    (d,) = diagnose(model().replace("heads = 4", "heads = 4\x00"))
    assert d.code == "E002"
    assert "\x00" not in d.message and "did you mean" not in d.message


def test_repeat_keyword_arguments_in_any_order():
    text = "model m {\n  dim = 64\n  layout = repeat(n: 2, blocks: [a])\n  block a {\n    mlp ffn {}\n  }\n}\n"
    assert diagnose(text) == []


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(model("    memory mix { update = gd(lr: 1e999) }"), id="memory-lr"),
        pytest.param(model("    mlp ffn { expand = 1e999 }"), id="mlp-expand"),
        pytest.param(model(fields="  train { update = sgd(lr: 1e999) }\n"), id="outer-lr"),
    ],
)
def test_infinite_numbers_are_refused(text):
    (d,) = diagnose(text)
    assert d.code == "E205"


def test_adamw_betas_are_below_one():
    (d,) = diagnose(model(fields="  train { update = adamw(betas: [1, 0.5]) }\n"))
    assert d.code == "E205"
