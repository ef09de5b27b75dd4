"""Golden tests: every case directory under tests/golden holds an `input.nl` (and any files it
uses) and the exact output expected from it.

- `ok_*` cases must check cleanly; `expected.nl` is what `nlc render input.nl` prints.
- every other case must fail; `stderr.txt` is what `nlc check input.nl` prints.

Run with `--update-goldens` to rewrite the expected files from the current output (then read
the diff: a golden is only as good as its review).
"""

from pathlib import Path

import pytest

from nlc.cli import main
from nlc.diagnostics import CODES
from nlc.spec import load_spec

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "input.nl").is_file())

# Cases whose expected output is right but not yet produced (each fails today).
KNOWN_BUGS: dict[str, str] = {}


def case_param(case: str):
    if case in KNOWN_BUGS:
        return pytest.param(case, marks=pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[case]))
    return case


def run_cli(argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_there_are_enough_cases():
    errors = [c for c in CASES if not c.startswith("ok_")]
    assert len(errors) >= 40
    assert len(CASES) - len(errors) >= 8


def test_every_error_code_has_a_golden():
    seen = {
        code
        for case in CASES
        if (GOLDEN / case / "stderr.txt").is_file()
        for code in CODES
        if f"error[{code}]" in (GOLDEN / case / "stderr.txt").read_text(encoding="utf-8")
    }
    assert seen == set(CODES)


@pytest.mark.parametrize("case", [case_param(c) for c in CASES])
def test_golden(case, capsys, monkeypatch, request):
    update = request.config.getoption("--update-goldens") and case not in KNOWN_BUGS
    folder = GOLDEN / case
    monkeypatch.chdir(folder)
    code, out, err = run_cli(["check", "input.nl"], capsys)
    assert out == ""
    if case.startswith("ok_"):
        assert (code, err) == (0, ""), err
        code, rendered, err = run_cli(["render", "input.nl"], capsys)
        assert (code, err) == (0, "")
        expected = folder / "expected.nl"
        if update:
            expected.write_bytes(rendered.encode("utf-8"))
        assert rendered == expected.read_bytes().decode("utf-8")
        # The rendered text is a fixed point: it checks and renders to itself.
        assert load_spec("expected.nl")[1] == []
        code, again, _ = run_cli(["render", "expected.nl"], capsys)
        assert (code, again) == (0, rendered)
    else:
        assert code == 1
        assert err, "a failed check must say why"
        assert "Traceback" not in err
        expected = folder / "stderr.txt"
        if update:
            expected.write_bytes(err.encode("utf-8"))
        assert err == expected.read_bytes().decode("utf-8")  # bytes: no newline translation
