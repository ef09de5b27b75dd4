"""The `nlc` command line: exit codes, JSON diagnostics, the fmt modes, directories, and that
checking never imports torch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from nlc.cli import main

ROOT = Path(__file__).resolve().parents[2]
SPECS = ROOT / "specs"
CATALOGUE = sorted(SPECS.glob("*.nl"))

VALID = "model m {\n  dim = 64\n  depth = 1\n  block {\n    mlp ffn {}\n  }\n}\n"
INVALID = "model m {\n  dim = 64\n  depth = 1\n  block {\n    memory mix {\n      objective = l3\n      batch = 16\n    }\n  }\n}\n"
MESSY = "model m { dim=64; depth=1\n block { mlp ffn {} } }\n"
JSON_KEYS = {"path", "line", "column", "end_line", "end_column", "severity", "code", "message", "notes"}


def run(argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_check_valid_exits_0_silently(capsys):
    assert run(["check", *map(str, CATALOGUE)], capsys) == (0, "", "")


def test_check_invalid_exits_1_with_every_error(tmp_path, capsys):
    path = write(tmp_path, "bad.nl", INVALID)
    code, out, err = run(["check", str(path)], capsys)
    assert (code, out) == (1, "")
    assert err.count("error[") == 2
    assert f"{path}:6:19: error[E201]: unknown objective 'l3'; did you mean 'l2'?" in err
    assert f"{path}:7:15: error[E208]:" in err


def test_one_bad_file_among_good_ones_exits_1(tmp_path, capsys):
    good = write(tmp_path, "good.nl", VALID)
    bad = write(tmp_path, "bad.nl", INVALID)
    code, _, err = run(["check", str(good), str(bad), str(good)], capsys)
    assert code == 1
    assert str(good) not in err and str(bad) in err


def test_usage_errors_exit_2(tmp_path, capsys):
    code, _, err = run(["check", str(tmp_path / "missing.nl")], capsys)
    assert code == 2 and "no such file" in err
    assert run([], capsys)[0] == 2
    code, _, err = run(["check", str(tmp_path)], capsys)  # a directory without .nl files
    assert code == 2 and "no .nl files" in err
    code, _, err = run(["check"], capsys)
    assert code == 2 and "the following arguments are required: FILE" in err
    code, _, err = run(["check", "--format", "xml", str(CATALOGUE[0])], capsys)
    assert code == 2 and "invalid choice: 'xml'" in err


def test_exit_codes_of_the_installed_command(tmp_path):
    bad = write(tmp_path, "bad.nl", INVALID)
    cases = [(["check", str(SPECS / "hope.nl")], 0), (["check", str(bad)], 1), (["check", str(tmp_path / "none.nl")], 2), (["check"], 2)]
    for argv, expected in cases:
        result = subprocess.run([sys.executable, "-m", "nlc", *argv], capture_output=True, text=True, timeout=60)
        assert result.returncode == expected, (argv, result.stderr)
        assert "Traceback" not in result.stderr


def test_json_diagnostics(tmp_path, capsys):
    bad = write(tmp_path, "bad.nl", INVALID)
    code, out, err = run(["check", "--format", "json", str(bad)], capsys)
    assert (code, err) == (1, "")
    rows = json.loads(out)
    assert [set(r) for r in rows] == [JSON_KEYS, JSON_KEYS]
    first = rows[0]
    assert first == {
        "path": str(bad),
        "line": 6,
        "column": 19,
        "end_line": 6,
        "end_column": 21,
        "severity": "error",
        "code": "E201",
        "message": "unknown objective 'l3'; did you mean 'l2'?",
        "notes": ["expected 'dot', 'l2', 'lp' or 'huber'"],
    }
    assert rows[1]["code"] == "E208"


def test_json_of_several_files_is_one_document(tmp_path, capsys):
    a = write(tmp_path, "a.nl", INVALID)
    b = write(tmp_path, "b.nl", "model m {\n")
    code, out, _ = run(["check", "--format", "json", str(a), str(b)], capsys)
    assert code == 1
    assert [r["path"] for r in json.loads(out)] == [str(a), str(a), str(b)]


def test_json_of_a_valid_file_is_an_empty_list(capsys):
    code, out, err = run(["check", "--format", "json", str(SPECS / "hope.nl")], capsys)
    assert (code, json.loads(out), err) == (0, [], "")


def test_json_keeps_non_ascii_messages(tmp_path, capsys):
    bad = write(tmp_path, "bad.nl", "model m {\n  d\u0456m = 1\n}\n")
    code, out, _ = run(["check", "--format", "json", str(bad)], capsys)
    (row,) = json.loads(out)
    assert (code, row["code"], row["line"], row["column"]) == (1, "E002", 2, 4)
    assert "\u0456" in row["message"]


def test_a_directory_stands_for_the_nl_files_directly_in_it(tmp_path, capsys):
    write(tmp_path, "a.nl", VALID)
    write(tmp_path, "b.nl", INVALID)
    write(tmp_path, "c.nl", "model m {\n")
    write(tmp_path, "notes.txt", "not a spec {")
    write(tmp_path, "sub/d.nl", "not a spec {")
    code, out, _ = run(["check", "--format", "json", str(tmp_path)], capsys)
    assert code == 1
    assert [r["path"] for r in json.loads(out)] == [str(tmp_path / "b.nl")] * 2 + [str(tmp_path / "c.nl")]
    assert run(["check", str(tmp_path / "sub" / "..")], capsys)[0] == 1


def test_fmt_prints_the_canonical_form(tmp_path, capsys):
    path = write(tmp_path, "m.nl", MESSY)
    code, out, err = run(["fmt", str(path)], capsys)
    assert (code, err) == (0, "")
    assert out == "model m {\n  dim = 64\n  depth = 1\n  block {\n    mlp ffn {}\n  }\n}\n"
    assert path.read_text() == MESSY


def test_fmt_write_rewrites_in_place(tmp_path, capsys):
    messy = write(tmp_path, "m.nl", MESSY)
    canonical = write(tmp_path, "c.nl", VALID)
    os.chmod(messy, 0o640)
    code, out, err = run(["fmt", "-w", str(tmp_path)], capsys)
    assert (code, out, err) == (0, "", "")
    assert messy.read_text() == VALID
    assert canonical.read_text() == VALID
    assert messy.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.nl", "m.nl"]  # no temporary file left


def test_fmt_check(tmp_path, capsys):
    canonical = write(tmp_path, "c.nl", VALID)
    assert run(["fmt", "--check", str(canonical)], capsys) == (0, "", "")
    messy = write(tmp_path, "m.nl", MESSY)
    code, out, err = run(["fmt", "--check", str(tmp_path)], capsys)
    assert (code, out) == (1, "")
    assert f"{messy}: not in canonical form" in err and str(canonical) not in err
    assert messy.read_text() == MESSY
    assert run(["fmt", "--check", *map(str, CATALOGUE)], capsys) == (0, "", "")


def test_fmt_diff(tmp_path, capsys):
    messy = write(tmp_path, "m.nl", MESSY)
    code, out, err = run(["fmt", "-d", str(messy)], capsys)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"--- a/{messy}" and lines[1] == f"+++ b/{messy}"
    assert "-model m { dim=64; depth=1" in lines and "+  dim = 64" in lines
    assert messy.read_text() == MESSY
    assert run(["fmt", "-d", str(write(tmp_path, "c.nl", VALID))], capsys) == (0, "", "")


def test_fmt_modes_are_exclusive(tmp_path, capsys):
    code, _, err = run(["fmt", "-w", "--check", str(write(tmp_path, "c.nl", VALID))], capsys)
    assert code == 2 and "not allowed with argument" in err


def test_fmt_of_a_malformed_file_reports_and_keeps_it(tmp_path, capsys):
    bad = write(tmp_path, "bad.nl", "model m {\n  dim = = 1\n}\n")
    code, out, err = run(["fmt", "-w", str(bad)], capsys)
    assert (code, out) == (1, "")
    assert f"{bad}:2:9: error[E003]" in err
    assert bad.read_text() == "model m {\n  dim = = 1\n}\n"


def test_fmt_of_invalid_utf8_reports_and_keeps_it(tmp_path, capsys):
    bad = tmp_path / "bad.nl"
    bad.write_bytes(b"mlp a { dim = 1 } # \xff\n")
    code, _, err = run(["fmt", "-w", str(bad)], capsys)
    assert code == 1 and "error[E001]" in err
    assert bad.read_bytes() == b"mlp a { dim = 1 } # \xff\n"


def test_render(tmp_path, capsys):
    code, out, err = run(["render", str(SPECS / "hope.nl")], capsys)
    assert (code, err) == (0, "")
    assert out.startswith("## Hope") and "  layout = [main, main, main, main]\n" in out
    assert run(["render", str(SPECS / "hope.nl"), "hope"], capsys)[1] == out
    code, _, err = run(["render", str(write(tmp_path, "bad.nl", INVALID))], capsys)
    assert code == 1 and "error[E201]" in err
    code, _, err = run(["render", str(SPECS / "hope.nl"), "nope"], capsys)
    assert code == 2 and "declares no 'nope' (it declares: hope)" in err


def test_paths_are_printed_as_given(tmp_path, capsys, monkeypatch):
    write(tmp_path, "sub/bad.nl", INVALID)
    monkeypatch.chdir(tmp_path)
    _, _, err = run(["check", "sub/bad.nl"], capsys)
    assert err.startswith("sub/bad.nl:6:19: ")


def test_check_never_imports_torch(tmp_path):
    shutil.copy(SPECS / "hope.nl", tmp_path / "hope.nl")
    write(tmp_path, "bad.nl", INVALID)
    code = (
        "import sys\n"
        "import nlc.cli, nlc.spec, nlc.syntax\n"
        "from nlc.cli import main\n"
        f"codes = [main(['check', {str(tmp_path / 'hope.nl')!r}]), main(['check', '--format', 'json', {str(tmp_path)!r}])]\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'triton'))\n"
        "print(codes, heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[0, 1] []"
