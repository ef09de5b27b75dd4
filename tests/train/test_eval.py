"""Evaluation: reading in pieces equals one call, streaming with the state carried, accuracy and bits
per byte against direct computations, and `nlc eval` on a checkpoint saved here (its output and its
refusals of bad input, exit code 2)."""

import contextlib
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import nlc
from nlc.cli import main
from nlc.spec import schema as s
from nlc.train.checkpoint import save_checkpoint, spec_sha256
from nlc.train.evaluate import bits_per_byte, outer_frozen, read, stream, task_accuracy
from nlc.train.tasks import IGNORE, make_task

MQAR = "data = mqar(keys: 4, queries: 4, vocab: 16)"


def save(model, spec: Path, out: Path) -> None:
    """A checkpoint as the training loop writes it (nlc.train.checkpoint), at step 0."""
    meta = {"spec_path": str(spec), "spec_sha256": spec_sha256(spec), "model_name": spec.stem, "step": 0}
    save_checkpoint(out, model, None, meta)


def model64(spec: Path):
    torch.manual_seed(0)
    return nlc.load(str(spec)).double().eval()


@pytest.mark.parametrize("mixer", ["deltanet", "attention"])
def test_reading_in_pieces_equals_one_call(spec, mixer):
    model = model64(spec(mixer))
    tokens, targets = torch.randint(256, (2, 45)), torch.randint(256, (2, 45))
    targets[:, ::3] = IGNORE
    with torch.no_grad():
        whole, _ = model(tokens)
    with outer_frozen(model):
        logits, losses, _ = read(model, tokens, targets, 16)
    torch.testing.assert_close(logits, whole, rtol=1e-10, atol=1e-10)
    expected = F.cross_entropy(whole.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none").view(2, 45)
    torch.testing.assert_close(losses, expected, rtol=1e-10, atol=1e-10)


def test_reading_learns_like_the_training_loop(spec):
    """A task-objective cms learns in context while it is evaluated, as in `sequence_loss`."""
    from nlc.train.loop import sequence_loss, task_chunk

    model = model64(spec("cms"))
    tokens, targets = torch.randint(256, (2, 40)), torch.randint(256, (2, 40))
    trained = sequence_loss(model, model, tokens, targets, task_chunk(model), contextlib.nullcontext)
    with outer_frozen(model):
        _, losses, _ = read(model, tokens, targets, 32)
    assert losses.sum().item() == pytest.approx(trained.item(), rel=1e-10)
    with torch.no_grad():
        frozen = F.cross_entropy(model(tokens)[0].flatten(0, 1), targets.flatten(), reduction="sum")
    assert losses.sum().item() != pytest.approx(frozen.item(), rel=1e-6), "the levels wrote between pieces"


@pytest.mark.parametrize("mixer", ["deltanet", "attention"])
def test_stream_without_task_cms_equals_one_call(spec, mixer):
    model = model64(spec(mixer))
    data = torch.randint(256, (70,), dtype=torch.uint8)
    result = stream(model, data, segment=16)
    with torch.no_grad():
        logits, _ = model(data.long()[None])
    expected = F.cross_entropy(logits[0, :-1], data[1:].long(), reduction="none")  # [69]
    torch.testing.assert_close(result.losses.double(), expected, rtol=1e-10, atol=1e-10)
    assert [(a, b) for a, b, _ in result.segments] == [(0, 16), (16, 32), (32, 48), (48, 64), (64, 69)]
    for start, end, loss in result.segments:
        assert loss == pytest.approx(expected[start:end].mean().item())


def test_stream_from_fresh_states_reads_each_segment_alone(spec):
    model = model64(spec("deltanet"))
    data = torch.randint(256, (40,), dtype=torch.uint8)
    result = stream(model, data, segment=16, carry=False)
    expected = []
    with torch.no_grad():
        for start in (0, 16, 32):
            piece = data[start : start + 17].long()
            logits, _ = model(piece[None, :-1])
            expected.append(F.cross_entropy(logits[0, : len(piece) - 1], piece[1:], reduction="none"))
    torch.testing.assert_close(result.losses.double(), torch.cat(expected), rtol=1e-10, atol=1e-10)


def test_stream_keeps_a_task_cms_learning(spec):
    model = model64(spec("cms"))
    data = torch.randint(256, (40,), dtype=torch.uint8)
    result = stream(model, data, segment=8)
    with torch.no_grad():
        logits, _ = model(data.long()[None])
    frozen = F.cross_entropy(logits[0, :-1], data[1:].long(), reduction="none")  # the levels never write
    torch.testing.assert_close(result.losses[:8].double(), frozen[:8], rtol=1e-10, atol=1e-10)
    assert not torch.allclose(result.losses[8:].double(), frozen[8:], rtol=1e-6, atol=1e-9), "the level wrote after the first segment"
    assert all(p.requires_grad and p.grad is None for p in model.parameters()), "the outer parameters are left as they were"


def test_task_accuracy_matches_a_direct_count(spec):
    model = model64(spec("deltanet"))
    task = make_task(s.Mqar(keys=4, queries=4, vocab=16))
    accuracy = task_accuracy(model, task, torch.Generator().manual_seed(5), 3, 4, 32, 16)
    generator, correct, total = torch.Generator().manual_seed(5), 0, 0
    with torch.no_grad():
        for _ in range(3):
            tokens, targets = task.batch(generator, 4, 32)
            predicted = model(tokens)[0].argmax(-1)
            for p, t in zip(predicted.flatten().tolist(), targets.flatten().tolist()):
                if t != IGNORE:
                    correct, total = correct + (p == t), total + 1
    assert total == 3 * 4 * 4 and accuracy == pytest.approx(correct / total)


def test_bits_per_byte_matches_a_direct_mean(spec):
    from nlc.train.data import ByteData

    model = model64(spec("deltanet"))
    data = ByteData("test", train=torch.zeros(0, dtype=torch.uint8), held_out=torch.randint(256, (100,), dtype=torch.uint8))
    bpb = bits_per_byte(model, data, torch.Generator().manual_seed(1), 2, 3, 16)
    generator, losses = torch.Generator().manual_seed(1), []
    with torch.no_grad():
        for _ in range(2):
            starts = torch.randint(0, 100 - 16, (3,), generator=generator)
            for start in starts.tolist():
                window = data.held_out[start : start + 17].long()
                losses.append(F.cross_entropy(model(window[None, :-1])[0][0], window[1:], reduction="none"))
    assert bpb == pytest.approx(torch.cat(losses).mean().item() / math.log(2))


@pytest.fixture
def run_dir(spec, tmp_path):
    """A folder holding deltanet.nl (trained on mqar) and run/, its checkpoint with random weights."""
    path = spec("deltanet", train=MQAR, name="deltanet")
    torch.manual_seed(0)
    save(nlc.load(str(path)), path, tmp_path / "run")
    return tmp_path


def nlc_eval(capsys, *argv):
    capsys.readouterr()
    code = main(["eval", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_prints_the_accuracy_of_the_spec_task(run_dir, capsys):
    code, out, err = nlc_eval(capsys, run_dir / "deltanet.nl", "--checkpoint", run_dir / "run", "--batches", 2, "--seed", 3)
    assert (code, err) == (0, "")
    assert out.startswith("mqar(keys: 4, queries: 4, vocab: 16): accuracy ")
    printed = float(out.split("accuracy ")[1].split()[0])
    from nlc.train.checkpoint import load_model

    model, _ = load_model(run_dir / "run", run_dir / "deltanet.nl")
    task = make_task(s.Mqar(keys=4, queries=4, vocab=16))
    assert printed == pytest.approx(task_accuracy(model.eval(), task, torch.Generator().manual_seed(3), 2, 4, 32, 32), abs=1e-4)


def test_eval_niah_reports_each_length(run_dir, capsys):
    argv = [run_dir / "deltanet.nl", "--checkpoint", run_dir / "run", "--task", "niah", "--lengths", "16,96", "--batches", 1]
    code, out, err = nlc_eval(capsys, *argv)
    assert (code, err) == (0, "")
    rows = [line.split() for line in out.splitlines()[2:]]
    assert [row[0] for row in rows] == ["16", "96"]
    assert all(0 <= float(row[1]) <= 1 for row in rows)
    assert "beyond the training context" in out.splitlines()[3] and "beyond" not in out.splitlines()[2]


def test_eval_bytes_reports_bits_per_byte(run_dir, capsys):
    text = run_dir / "text.txt"
    text.write_bytes(bytes(range(256)) * 4)
    code, out, err = nlc_eval(capsys, run_dir / "deltanet.nl", "--checkpoint", run_dir / "run", "--data", text, "--batches", 1)
    assert (code, err) == (0, "")
    assert "bits per byte" in out and 0 < float(out.split("validation ")[1].split()[0]) < 20


def test_eval_stream_prints_segments_and_draws_the_curve(run_dir, capsys):
    text = run_dir / "doc.txt"
    text.write_bytes(b"the state is carried from one segment to the next. " * 3)  # 153 bytes
    code, out, err = nlc_eval(capsys, run_dir / "deltanet.nl", "--checkpoint", run_dir / "run", "--stream", text, "--segment", 64, "--fresh")
    assert (code, err) == (0, "")
    rows = [line.split() for line in out.splitlines()[2:6]]
    assert [row[:2] for row in rows] == [["0", "1-64"], ["1", "65-128"], ["2", "129-152"], ["all", "1-152"]]
    assert rows[0][2] == rows[0][4], "the first segment starts from the initial state either way"
    plot = run_dir / "run" / "loss_stream.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


BAD = [
    (["--segment", "8"], "only apply with --stream"),
    (["--fresh"], "only apply with --stream"),
    (["--stream", "MISSING"], "does not exist"),
    (["--stream", "DOC", "--task", "mqar"], "does not take --task"),
    (["--task", "bytes"], "--task bytes needs the file"),
    (["--data", "MISSING"], "does not exist"),
    (["--data", "wibble(3)"], "wibble"),
    (["--task", "copy", "--data", "mqar"], "name different data"),
    (["--task", "mqar", "--lengths", "64"], "--lengths applies to niah"),
    (["--task", "niah", "--lengths", "4"], "at least 8"),
    (["--data", "copy(length: 20)"], "context of at least 41"),
    (["--stream", "DOC", "--plot", "NOWHERE/plot.png"], "does not exist"),
]


@pytest.mark.parametrize("flags, message", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_eval_refuses_bad_input_with_exit_2(run_dir, capsys, flags, message):
    (run_dir / "doc.txt").write_bytes(b"some text to stream")
    flags = [str(run_dir / f) if f in ("MISSING", "DOC", "NOWHERE/plot.png") else f for f in flags]
    code, out, err = nlc_eval(capsys, run_dir / "deltanet.nl", "--checkpoint", run_dir / "run", *flags)
    assert code == 2 and out == ""
    assert err.startswith("nlc eval: error: ") and message in err


def test_eval_refuses_a_wrong_or_missing_checkpoint(run_dir, spec, capsys):
    code, _, err = nlc_eval(capsys, spec("attention"), "--checkpoint", run_dir / "run")
    assert code == 2 and "trained on a different spec" in err
    code, _, err = nlc_eval(capsys, run_dir / "deltanet.nl", "--checkpoint", run_dir / "nothing")
    assert code == 2 and "does not exist" in err
    (run_dir / "empty").mkdir()
    code, _, err = nlc_eval(capsys, run_dir / "deltanet.nl", "--checkpoint", run_dir / "empty")
    assert code == 2 and "checkpoint.safetensors is missing" in err
    code, _, err = nlc_eval(capsys, run_dir / "none.nl", "--checkpoint", run_dir / "run")
    assert code == 2 and "no such file" in err


def test_eval_refuses_a_task_wider_than_the_vocab(spec, tmp_path, capsys):
    path = spec("deltanet", train="data = niah(length: 32)", vocab=64)
    torch.manual_seed(0)
    save(nlc.load(str(path)), path, tmp_path / "run")
    code, _, err = nlc_eval(capsys, path, "--checkpoint", tmp_path / "run")
    assert code == 2 and "uses 132 token ids but the model's vocab is 64" in err


def test_eval_reports_spec_errors_with_exit_1(tmp_path, capsys):
    spec = tmp_path / "broken.nl"
    spec.write_text("model m {\n  dim = 32\n  depth = 1\n  block { memory mix { objective = l3 } }\n}\n", encoding="utf-8")
    code, _, err = nlc_eval(capsys, spec, "--checkpoint", tmp_path)
    assert code == 1 and "unknown objective 'l3'" in err


@pytest.mark.parametrize("flags", [["--batches", "0"], ["--batches", "many"], ["--task", "sorting"], ["--segment", "-1"]])
def test_eval_bad_flag_values_exit_2(run_dir, capsys, flags):
    assert main(["eval", str(run_dir / "deltanet.nl"), "--checkpoint", str(run_dir / "run"), *flags]) == 2
    assert "error: argument" in capsys.readouterr().err
