"""The wheel carries the grammar: built, installed into a bare folder and run from elsewhere,
`nlc check` works without the source tree."""

import importlib.util
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_installed_wheel_checks_a_spec(tmp_path):
    if importlib.util.find_spec("hatchling") is None:
        pytest.skip("hatchling (the build backend) is not installed: pip install hatchling")
    dist, target, elsewhere = tmp_path / "dist", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = dist.glob("nlc-*.whl")
    assert "nlc/grammar/nl.lark" in zipfile.ZipFile(wheel).namelist()
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)], capture_output=True, text=True, timeout=300
    )
    assert install.returncode == 0, install.stderr

    spec = elsewhere / "hope.nl"
    spec.write_bytes((ROOT / "specs" / "hope.nl").read_bytes())
    (elsewhere / "bad.nl").write_text("model m {\n  dim = 64\n  objective = l3\n}\n")
    code = (
        "import nlc, nlc.syntax.parser as p\n"
        "from nlc.cli import main\n"
        "print(nlc.__file__)\n"
        "print(p.grammar_text() == (p.resources.files('nlc') / 'grammar' / 'nl.lark').read_text())\n"
        "print(main(['check', 'hope.nl']), main(['check', 'bad.nl']))\n"
    )
    # -S: no site-packages processing, so the editable install of the source tree is not seen;
    # the venv's site-packages comes after the installed wheel only for lark, pydantic and the rest.
    path = f"{target}:{sysconfig.get_paths()['purelib']}"
    run = subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=elsewhere, env={"PYTHONPATH": path, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    origin, packaged, codes = run.stdout.splitlines()
    assert origin == str(target / "nlc" / "__init__.py")
    assert packaged == "True"
    assert codes == "0 1"
    assert "bad.nl:3:3: error[E202]: unknown field 'objective' in model 'm'" in run.stderr
