"""Training data: byte streams (a file, or the built-in corpus) and the synthetic tasks.

Every source answers `batch(generator, batch, context) -> (tokens [B, T], targets [B, T])`, targets
-100 where no loss is taken, and `validation(batch, context) -> [(tokens, targets), ...]`, a fixed
set of held-out batches. Batches depend only on the generator, so the generator's state is the
data position that a checkpoint saves.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

BYTE_VOCAB = 256
VALIDATION_SEED = 1234  # the held-out windows are the same in every run and every process
VALIDATION_FILE_EVERY = 20  # corpus: every 20th file (sorted by name) is held out
VALIDATION_FRACTION = 0.1  # bytes(path): the last tenth of the file is held out


class DataError(Exception):
    """The data cannot be used (a missing or empty file, too short for the context, a task not available)."""


def corpus_files() -> list[Path]:
    """The running Python's standard-library modules (`*.py` at the top of the stdlib), sorted by name."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(stdlib.glob("*.py"))


@dataclass
class ByteData:
    """Contiguous windows of `context + 1` bytes: the first `context` are the input, the last `context` the targets."""

    name: str
    train: torch.Tensor  # [N] uint8
    held_out: torch.Tensor  # [M] uint8
    vocab: int = BYTE_VOCAB

    def check(self, context: int) -> None:
        for part, data in (("training", self.train), ("validation", self.held_out)):
            if len(data) < context + 1:
                raise DataError(
                    f"{self.name}: the {part} part has {len(data)} bytes, fewer than context + 1 = {context + 1}; use a longer file or a shorter --context"
                )

    def batch(self, generator: torch.Generator, batch: int, context: int) -> tuple[torch.Tensor, torch.Tensor]:
        return windows(self.train, generator, batch, context)

    def validation(self, batch: int, context: int, batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(VALIDATION_SEED)
        return [windows(self.held_out, generator, batch, context) for _ in range(batches)]


def windows(data: torch.Tensor, generator: torch.Generator, batch: int, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, len(data) - context, (batch,), generator=generator)  # [B]
    offsets = torch.arange(context + 1)  # [T + 1]
    chunk = data[starts[:, None] + offsets].long()  # [B, T + 1]
    return chunk[:, :-1], chunk[:, 1:]


def read_bytes(path: str) -> torch.Tensor:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file '{path}' does not exist" if not p.exists() else f"data path '{path}' is not a file")
    raw = p.read_bytes()
    if not raw:
        raise DataError(f"data file '{path}' is empty")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def file_data(path: str, context: int) -> ByteData:
    data = read_bytes(path)
    split = max(0, len(data) - max(context + 1, int(len(data) * VALIDATION_FRACTION)))  # at least one held-out window
    return ByteData(name=f"bytes('{path}')", train=data[:split], held_out=data[split:])


def corpus_data() -> ByteData:
    files = corpus_files()
    if not files:
        raise DataError(f"the built-in corpus is empty: no *.py files in {sysconfig.get_paths()['stdlib']}")
    train = [f.read_bytes() for i, f in enumerate(files) if i % VALIDATION_FILE_EVERY != 0]
    held_out = [f.read_bytes() for i, f in enumerate(files) if i % VALIDATION_FILE_EVERY == 0]
    as_tensor = lambda parts: torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)  # noqa: E731
    return ByteData(name="corpus", train=as_tensor(train), held_out=as_tensor(held_out))


@dataclass
class TaskData:
    """A synthetic task (`nlc.train.tasks`): fresh random instances for training, a fixed set for validation."""

    name: str
    task: object  # nlc.train.tasks.Task

    @property
    def vocab(self) -> int:
        return self.task.vocab

    def check(self, context: int) -> None:
        self.task.batch(torch.Generator().manual_seed(0), 1, context)  # the task refuses a context too short

    def batch(self, generator: torch.Generator, batch: int, context: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.task.batch(generator, batch, context)

    def validation(self, batch: int, context: int, batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(VALIDATION_SEED)
        return [self.task.batch(generator, batch, context) for _ in range(batches)]


def make_data(node, context: int) -> ByteData | TaskData:
    """The data source that a spec's `train.data` (nlc.spec.schema.Data) names, checked for `context`."""
    source = _make_data(node, context)
    try:
        source.check(context)
    except ValueError as e:  # a task's own refusal (a context too short for one example)
        raise DataError(str(e)) from None
    return source


def _make_data(node, context: int) -> ByteData | TaskData:
    if node.kind == "bytes":
        return file_data(node.path, context)
    if node.kind == "corpus":
        return corpus_data()
    try:
        from nlc.train.tasks import make_task
    except ImportError:
        raise DataError(f"the synthetic task '{node.kind}' is not available in this installation (nlc.train.tasks is missing)") from None
    try:
        return TaskData(name=node.kind, task=make_task(node))
    except (ValueError, NotImplementedError) as e:
        raise DataError(f"{node.kind}: {e}") from None


def parse_data_flag(text: str):
    """`--data` takes the spec's syntax: `bytes("path")`, `corpus`, `mqar(keys: 8)`, ... -> a Data node.

    A bare path to an existing file is accepted as `bytes(path)`."""
    from pydantic import TypeAdapter, ValidationError

    from nlc.spec.schema import Data

    text = text.strip()
    if "(" not in text and text not in ("corpus", "mqar", "niah", "copy", "parity"):
        if Path(text).exists() or "/" in text or "." in text:
            return TypeAdapter(Data).validate_python({"kind": "bytes", "path": text})
        raise DataError(f"--data: unknown data source '{text}' (expected bytes(\"path\"), corpus, mqar, niah, copy or parity)")
    kind, _, rest = text.partition("(")
    kind = kind.strip()
    if rest and not rest.rstrip().endswith(")"):
        raise DataError(f"--data: missing ')' in '{text}'")
    arguments = _parse_arguments(kind, rest.rstrip()[:-1] if rest else "")
    try:
        return TypeAdapter(Data).validate_python({"kind": kind, **arguments})
    except ValidationError as e:
        problem = e.errors()[0]
        raise DataError(f"--data: '{text}': {problem['msg']} ({'.'.join(map(str, problem['loc']))})") from None


def _parse_arguments(kind: str, inside: str) -> dict:
    """`"file.txt"` or `keys: 8, queries: 4` -> keyword arguments (a positional string is the path)."""
    arguments = {}
    for part in filter(None, (p.strip() for p in inside.split(","))):
        key, colon, value = part.partition(":")
        if not colon:
            key, value = "path", part
        value = value.strip()
        if value[:1] in "\"'" and value[-1:] == value[:1] and len(value) >= 2:
            arguments[key.strip()] = value[1:-1]
            continue
        try:
            arguments[key.strip()] = int(value)
        except ValueError:
            try:
                arguments[key.strip()] = float(value)
            except ValueError:
                raise DataError(f"--data: cannot read the value '{value}' of {kind}'s '{key.strip()}'") from None
    return arguments
