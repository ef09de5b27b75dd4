"""Data sources: windows of the byte stream, determinism from the generator state, the corpus split by
file, clear errors for unusable data, the `--data` syntax."""

import pytest
import torch

from nlc.spec.schema import Bytes, Corpus, Mqar
from nlc.train.data import DataError, corpus_files, make_data, parse_data_flag


def test_bytes_windows_are_contiguous_and_shifted_by_one(tmp_path):
    text = bytes(range(256)) * 8  # every window of a counting sequence counts up by one (mod 256)
    (tmp_path / "data.bin").write_bytes(text)
    data = make_data(Bytes(path=str(tmp_path / "data.bin")), context=16)
    assert data.vocab == 256 and len(data.train) + len(data.held_out) == len(text)
    assert len(data.held_out) == max(17, len(text) // 10)
    tokens, targets = data.batch(torch.Generator().manual_seed(0), 5, 16)
    assert tokens.shape == targets.shape == (5, 16) and tokens.dtype == targets.dtype == torch.int64
    assert torch.equal(targets[:, :-1], tokens[:, 1:])
    assert torch.equal((tokens + 1) % 256, targets)


def test_batches_depend_only_on_the_generator_state(tmp_path):
    (tmp_path / "data.txt").write_bytes(b"the quick brown fox jumps over the lazy dog. " * 50)
    data = make_data(Bytes(path=str(tmp_path / "data.txt")), context=8)
    generator = torch.Generator().manual_seed(3)
    data.batch(generator, 4, 8)
    saved = generator.get_state()
    expected = data.batch(generator, 4, 8)
    resumed = torch.Generator()
    resumed.set_state(saved)
    assert all(torch.equal(a, b) for a, b in zip(expected, data.batch(resumed, 4, 8)))
    validation = data.validation(2, 8, batches=3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(validation, data.validation(2, 8, batches=3)))


def test_corpus_is_the_stdlib_split_by_file():
    files = corpus_files()
    assert len(files) > 20 and files == sorted(files) and all(f.suffix == ".py" for f in files)
    data = make_data(Corpus(), context=64)
    held_out = b"".join(f.read_bytes() for f in files[::20])
    assert bytes(data.held_out.numpy()) == held_out
    assert len(data.train) == sum(f.stat().st_size for f in files) - len(held_out)


@pytest.mark.parametrize(
    ("content", "context", "message"),
    [
        (None, 8, "does not exist"),
        (b"", 8, "is empty"),
        (b"short", 8, "fewer than context"),
    ],
)
def test_unusable_files_are_refused(tmp_path, content, context, message):
    path = tmp_path / "data.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        make_data(Bytes(path=str(path)), context=context)


def test_a_task_refuses_a_context_too_short():
    with pytest.raises(DataError, match="needs a context of at least"):
        make_data(Mqar(keys=8, queries=8), context=8)


def test_data_flag_syntax(tmp_path):
    assert parse_data_flag('bytes("notes.txt")') == Bytes(path="notes.txt")
    assert parse_data_flag("corpus") == Corpus()
    assert parse_data_flag("mqar(keys: 4, vocab: 16)") == Mqar(keys=4, vocab=16)
    (tmp_path / "plain.txt").write_text("x")
    assert parse_data_flag(str(tmp_path / "plain.txt")) == Bytes(path=str(tmp_path / "plain.txt"))
    for bad, message in [
        ("tweets", "unknown data source"),
        ("mqar(keys: 0)", "greater than or equal"),
        ("mqar(bogus: 1)", "bogus"),
        ('bytes("a"', r"missing '\)'"),
    ]:
        with pytest.raises(DataError, match=message):
            parse_data_flag(bad)
