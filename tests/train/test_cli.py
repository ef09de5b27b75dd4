"""`nlc train` on the command line: a short run, and each kind of bad input with its message and exit
code (2: the command line, 1: the spec, the data or the checkpoint)."""

import json

import pytest

from nlc.cli import main


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"Nested learning: every level learns at its own frequency. " * 40)
    return path


def run(capsys, *argv):
    code = main(["train", *map(str, argv)])
    return code, capsys.readouterr().err


def test_a_short_run_on_a_file(spec, tmp_path, text_file, capsys):
    out = tmp_path / "run"
    code, err = run(
        capsys, spec(), "--data", f'bytes("{text_file}")', "--steps", 4, "--batch", 2, "--context", 16, "--eval-every", 2, "--out", out, "--no-progress"
    )
    assert code == 0, err
    assert "step 2/4: loss" in err and "step 4/4: loss" in err and f"outputs in {out}" in err  # one line per evaluation
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4] and [("val_bpb" in row) for row in rows] == [False, True, False, True]
    meta = json.loads((out / "checkpoint.json").read_text())
    assert meta["settings"]["context"] == 16 and meta["settings"]["data"] == {"kind": "bytes", "path": str(text_file)}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--steps", "0"], "--steps must be at least 1"),
        (["--lr", "-1"], "--lr must be a positive number"),
        (["--until", "13"], "--until must lie between 1 and the number of steps"),
        (["--data", "tweets"], "unknown data source 'tweets'"),
        (["--device", "nonsense"], "--device nonsense: not usable"),
    ],
)
def test_bad_flag_values_are_usage_errors(spec, tmp_path, capsys, flags, message):
    code, err = run(capsys, spec(), "--out", tmp_path / "run", *flags)
    assert code == 2 and message in err and err.startswith("nlc train: error:")
    assert not (tmp_path / "run").exists()


def test_unknown_flag_and_missing_spec(tmp_path, capsys):
    assert main(["train", "spec.nl", "--stepz", "3"]) == 2
    assert "unrecognized arguments: --stepz" in capsys.readouterr().err
    code, err = run(capsys, tmp_path / "absent.nl")
    assert code == 2 and "cannot read spec" in err


def test_bad_data_spec_and_vocab_are_errors_before_any_work(spec, tmp_path, text_file, capsys):
    out = tmp_path / "run"
    code, err = run(capsys, spec(), "--data", f'bytes("{tmp_path / "missing.txt"}")', "--out", out)
    assert code == 1 and "missing.txt' does not exist" in err
    (tmp_path / "empty.txt").write_bytes(b"")
    code, err = run(capsys, spec(), "--data", tmp_path / "empty.txt", "--out", out)
    assert code == 1 and "is empty" in err
    code, err = run(capsys, spec(vocab=64, name="small_vocab"), "--data", text_file, "--out", out)
    assert code == 1 and "vocabulary mismatch" in err and "256 tokens" in err
    broken = tmp_path / "broken.nl"
    broken.write_text("model broken { dim = 32 }\n")
    code, err = run(capsys, broken, "--out", out)
    assert code == 1 and "the spec has errors" in err and "broken.nl:1" in err
    assert not out.exists()


def test_checkpoint_mistakes(spec, tmp_path, text_file, capsys):
    out = tmp_path / "run"
    common = ["--data", text_file, "--context", 16, "--batch", 2, "--no-progress", "--out", out]
    code, err = run(capsys, spec(), "--resume", *common)
    assert code == 1 and "cannot resume: no checkpoint" in err
    assert run(capsys, spec(), "--steps", 4, "--until", 1, *common)[0] == 0
    code, err = run(capsys, spec(), *common)
    assert code == 1 and "already holds a checkpoint: pass --resume" in err
    code, err = run(capsys, spec("deltanet"), "--resume", *common)
    assert code == 1 and "different spec" in err
    assert run(capsys, spec(), "--resume", *common)[0] == 0  # the run's own settings: steps 4, context 16
    code, err = run(capsys, spec(), "--resume", *common)
    assert code == 1 and "nothing to do" in err


def test_divergence_exits_3_and_keeps_the_last_good_checkpoint(spec, tmp_path, text_file, capsys):
    out = tmp_path / "run"
    # AdamW moves every weight by about lr: 1e30 after step 1, so step 2 overflows
    code, err = run(capsys, spec(), "--lr", "1e30", "--steps", 3, "--eval-every", 1, "--data", text_file, "--context", 16, "--out", out, "--no-progress")
    assert code == 3 and "nlc train: diverged: step 2:" in err and "last good checkpoint" in err
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 1
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def test_the_progress_bar_shows_step_loss_and_speed(spec, tmp_path, text_file, capsys):
    code, err = run(capsys, spec(), "--steps", 2, "--eval-every", 2, "--data", text_file, "--context", 16, "--out", tmp_path / "run", "--progress")
    assert code == 0, err
    assert "step      2/2" in err and "tok/s" in err and "step 2: validation" in err
