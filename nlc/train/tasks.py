"""Synthetic tasks, generated on the fly from a seeded `torch.Generator`.

Every task yields `(tokens, targets)`, both `[B, T]` int64 with T = context. `targets[b, t]` is the
token that `logits[b, t]` must predict (already shifted, as in Zoology), or -100 where no loss is
taken: only answer positions count. The answer token itself follows in `tokens` (teacher forcing),
so a sequence reads like text a byte-level model could have seen.

Token layout, shared by every task so that a byte-level model (vocab 256) can learn them all:

    0 PAD      after the example, up to the context (never a target)
    1 SEP      end of the part to remember (mqar, copy) or of the bit string (parity)
    2 NEEDLE   niah: the needle `NEEDLE key value` follows
    3 QUERY    niah: `QUERY key` at the end; the answer is the needle's value
    4 ...      symbols: symbol i is token 4 + i; each task draws its fields from disjoint symbol ranges

    mqar(keys, queries, vocab)  keys are symbols [0, vocab/2), values [vocab/2, vocab); vocab 4 + vocab
        k1 v1 k2 v2 ... kK vK SEP q1 a1 q2 a2 ... PAD ...     target at each q_i: a_i
    niah(length)                keys [0, 32), values [32, 64), haystack [64, 128); vocab 132
        h h h NEEDLE k v h h h ... h h QUERY k v PAD ...      target at the final k: v
    copy(length)                symbols [0, 32); vocab 36
        s1 s2 ... sL SEP s1 s2 ... sL PAD ...                  targets from SEP on: s1 ... sL
    parity(length)              bits: symbols 0 and 1; vocab 6; n drawn uniformly from [1, length]
        b1 ... bn SEP p PAD ...                                target at SEP: p = (b1 + ... + bn) mod 2
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from nlc.spec import schema as s

IGNORE = -100
PAD, SEP, NEEDLE, QUERY = 0, 1, 2, 3
FIRST_SYMBOL = 4
NIAH_KEYS, NIAH_VALUES, NIAH_HAYSTACK = 32, 32, 64
COPY_SYMBOLS = 32
NIAH_MIN_LENGTH = 8  # a needle (3 tokens) and the query (3 tokens) apart


def symbols(start: int, count: int, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """Uniform tokens of the symbols [start, start + count)."""
    return FIRST_SYMBOL + start + torch.randint(count, shape, generator=generator)


def distinct(count: int, k: int, rows: int, generator: torch.Generator) -> Tensor:
    """`[rows, k]`: k distinct integers of [0, count) per row, in random order."""
    return torch.rand(rows, count, generator=generator).argsort(dim=1)[:, :k]


def pad_to(tokens: Tensor, targets: Tensor, context: int) -> tuple[Tensor, Tensor]:
    B, n = tokens.shape
    tokens = torch.cat([tokens, torch.full((B, context - n), PAD, dtype=torch.long)], dim=1)  # [B, T]
    targets = torch.cat([targets, torch.full((B, context - n), IGNORE, dtype=torch.long)], dim=1)  # [B, T]
    return tokens, targets


@dataclass(frozen=True)
class Task:
    """A synthetic task: `vocab` tokens, examples of at least `min_context` tokens."""

    name: str
    vocab: int
    min_context: int

    def batch(self, generator: torch.Generator, batch: int, context: int) -> tuple[Tensor, Tensor]:
        """`(tokens, targets)`, `[batch, context]` int64 each; targets are -100 except at answers."""
        if context < self.min_context:
            raise ValueError(f"{self.name} needs a context of at least {self.min_context} tokens, got {context}")
        tokens, targets = self.examples(generator, batch)
        return pad_to(tokens, targets, context)

    def examples(self, generator: torch.Generator, batch: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def check_model(self, vocab: int, context: int | None = None) -> None:
        """Raise ValueError when a model of this vocab (and context) cannot take the task."""
        if self.vocab > vocab:
            raise ValueError(f"{self.name} uses {self.vocab} token ids but the model's vocab is {vocab}")
        if context is not None and context < self.min_context:
            raise ValueError(f"{self.name} needs a context of at least {self.min_context} tokens; the model's is {context}")

    @staticmethod
    def accuracy(logits: Tensor, targets: Tensor) -> float:
        """Exact match of the greedy prediction, over answer tokens only: logits `[B, T, V]`, targets `[B, T]`."""
        answers = targets != IGNORE  # [B, T]
        if not answers.any():
            raise ValueError("no answer positions in the targets")
        return (logits.argmax(dim=-1)[answers] == targets[answers]).float().mean().item()


@dataclass(frozen=True)
class MqarTask(Task):
    keys: int
    queries: int
    symbols: int

    def examples(self, generator, batch):
        K, Q, half = self.keys, self.queries, self.symbols // 2
        keys = FIRST_SYMBOL + distinct(half, K, batch, generator)  # [B, K], distinct in each row
        values = symbols(half, self.symbols - half, (batch, K), generator)  # [B, K]
        # Without replacement when there are enough keys (Zoology), else with.
        asked = distinct(K, Q, batch, generator) if Q <= K else torch.randint(K, (batch, Q), generator=generator)  # [B, Q]
        query_keys, answers = keys.gather(1, asked), values.gather(1, asked)  # [B, Q]
        pairs = torch.stack([keys, values], dim=2).reshape(batch, 2 * K)  # [B, 2K]: k1 v1 k2 v2 ...
        queries = torch.stack([query_keys, answers], dim=2).reshape(batch, 2 * Q)  # [B, 2Q]: q1 a1 q2 a2 ...
        sep = torch.full((batch, 1), SEP, dtype=torch.long)
        tokens = torch.cat([pairs, sep, queries], dim=1)  # [B, 2K + 1 + 2Q]
        targets = torch.full_like(tokens, IGNORE)
        targets[:, 2 * K + 1 :: 2] = answers  # at q_i, predict a_i
        return tokens, targets


@dataclass(frozen=True)
class NiahTask(Task):
    length: int

    def examples(self, generator, batch):
        L = self.length
        tokens = symbols(NIAH_KEYS + NIAH_VALUES, NIAH_HAYSTACK, (batch, L), generator)  # [B, L] haystack
        keys = symbols(0, NIAH_KEYS, (batch, 1), generator)  # [B, 1]
        values = symbols(NIAH_KEYS, NIAH_VALUES, (batch, 1), generator)  # [B, 1]
        # Planted early: the needle starts in the first quarter, always before the query.
        depth = torch.randint(max(1, min(L // 4, L - 6)), (batch, 1), generator=generator)  # [B, 1]
        needle = torch.cat([torch.full_like(keys, NEEDLE), keys, values], dim=1)  # [B, 3]
        tokens.scatter_(1, depth + torch.arange(3), needle)
        tokens[:, -3:] = torch.cat([torch.full_like(keys, QUERY), keys, values], dim=1)  # QUERY k v
        targets = torch.full_like(tokens, IGNORE)
        targets[:, -2] = values[:, 0]
        return tokens, targets

    def at_length(self, length: int) -> NiahTask:
        """The same task with examples of another length (longer than training, for evaluation)."""
        if length < NIAH_MIN_LENGTH:
            raise ValueError(f"niah examples hold at least {NIAH_MIN_LENGTH} tokens, got {length}")
        return make_task(s.Niah(length=length))


@dataclass(frozen=True)
class CopyTask(Task):
    length: int

    def examples(self, generator, batch):
        string = symbols(0, COPY_SYMBOLS, (batch, self.length), generator)  # [B, L]
        sep = torch.full((batch, 1), SEP, dtype=torch.long)
        tokens = torch.cat([string, sep, string], dim=1)  # [B, 2L + 1]
        targets = torch.full_like(tokens, IGNORE)
        targets[:, self.length : 2 * self.length] = string  # SEP predicts s1, s1 predicts s2, ...
        return tokens, targets


@dataclass(frozen=True)
class ParityTask(Task):
    length: int

    def examples(self, generator, batch):
        L = self.length
        n = torch.randint(1, L + 1, (batch, 1), generator=generator)  # [B, 1] bits in each string
        bits = torch.randint(2, (batch, L), generator=generator)  # [B, L]
        position = torch.arange(L + 2)  # [L + 2]
        inside = position[:L] < n  # [B, L]
        parity = (bits * inside).sum(dim=1, keepdim=True) % 2  # [B, 1]
        tokens = torch.full((batch, L + 2), PAD, dtype=torch.long)
        tokens[:, :L] = torch.where(inside, FIRST_SYMBOL + bits, PAD)
        tokens.scatter_(1, n, SEP)
        tokens.scatter_(1, n + 1, FIRST_SYMBOL + parity)
        targets = torch.full_like(tokens, IGNORE)
        targets.scatter_(1, n, FIRST_SYMBOL + parity)  # at SEP, predict the parity bit
        return tokens, targets


def make_task(node: s.Mqar | s.Niah | s.Copy | s.Parity) -> Task:
    """The task of a `train.data` node of the IR (`bytes` and `corpus` are not synthetic)."""
    match node:
        case s.Mqar(keys=keys, queries=queries, vocab=vocab):
            if keys > vocab // 2:
                raise ValueError(f"mqar(keys: {keys}, vocab: {vocab}): {keys} distinct keys need vocab >= {2 * keys}")
            return MqarTask(f"mqar(keys: {keys}, queries: {queries}, vocab: {vocab})", FIRST_SYMBOL + vocab, 2 * keys + 1 + 2 * queries, keys, queries, vocab)
        case s.Niah(length=length):
            return NiahTask(f"niah(length: {length})", FIRST_SYMBOL + NIAH_KEYS + NIAH_VALUES + NIAH_HAYSTACK, length, length)
        case s.Copy(length=length):
            return CopyTask(f"copy(length: {length})", FIRST_SYMBOL + COPY_SYMBOLS, 2 * length + 1, length)
        case s.Parity(length=length):
            return ParityTask(f"parity(length: {length})", FIRST_SYMBOL + 2, length + 2, length)
    raise ValueError(f"'{getattr(node, 'kind', node)}' is not a synthetic task")
