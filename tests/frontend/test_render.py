"""`nlc render`: the resolved spec as text checks back to the same IR, whatever the layout of
the source."""

from pathlib import Path

import pytest

from nlc.spec import load_spec
from nlc.spec.render import render
from nlc.syntax import parse
from nlc.syntax.format import format_file

ROOT = Path(__file__).resolve().parents[2]
CATALOGUE = sorted((ROOT / "specs").glob("*.nl"))
ACCEPTED_GOLDENS = sorted(p for p in (ROOT / "tests" / "golden").glob("ok_*/input.nl") if (p.parent / "expected.nl").is_file())


def loaded(path: str, text: str | None = None):
    spec, diagnostics, _ = load_spec(path, text)
    assert diagnostics == [], diagnostics
    return spec


def meaning(spec) -> dict:
    return spec.model_dump(exclude={"path", "sha256"})


@pytest.mark.parametrize("path", CATALOGUE, ids=lambda p: p.name)
def test_rendered_catalogue_spec_checks_back_to_the_same_ir(path):
    spec = loaded(str(path))
    text = render(spec)
    again = loaded("rendered.nl", text)
    assert meaning(again) == meaning(spec)
    assert render(again) == text


@pytest.mark.parametrize("path", CATALOGUE, ids=lambda p: p.name)
def test_a_file_and_its_formatted_version_render_the_same(path):
    text = path.read_text(encoding="utf-8")
    # Unindent, drop blank lines and plain comments, tighten '=': then format that back.
    lines = [line.strip() if line.strip().startswith("##") else line.split("#")[0].strip().replace(" = ", "=") for line in text.splitlines()]
    squashed = "\n".join(line for line in lines if line)
    assert squashed != text
    for variant in (squashed, format_file(parse(squashed, "v.nl"))):
        assert render(loaded("v.nl", variant)) == render(loaded(str(path)))


@pytest.mark.parametrize("path", ACCEPTED_GOLDENS, ids=lambda p: p.parent.name)
def test_rendered_golden_checks_back_to_the_same_ir(path, monkeypatch):
    monkeypatch.chdir(path.parent)
    spec = loaded("input.nl")
    assert meaning(loaded("rendered.nl", render(spec))) == meaning(spec)


def test_render_one_declaration_by_name():
    text = "memory a {\n  dim = 64\n}\n\nmlp b {\n  dim = 32\n}\n"
    spec = loaded("x.nl", text)
    both = render(spec)
    assert render(spec, "a") + "\n" + render(spec, "b") == both
    assert render(spec, "b").startswith("mlp b {\n  dim = 32\n")


def test_render_writes_every_default():
    spec = loaded("x.nl", "model m {\n  dim = 64\n  depth = 1\n  block {\n    memory mix {}\n  }\n}\n")
    text = render(spec)
    for line in ["  vocab = 256", "  heads = 1", "  context = 512", "  layout = [main]", "      batch = 1 token", "      init = zeros", "    clip = 1.0"]:
        assert line + "\n" in text
