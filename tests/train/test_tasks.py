"""The synthetic tasks: every batch is read back by a decoder written here from the documented token
layout (plain Python, one sequence at a time), which recomputes the answers from the tokens alone and
checks that the targets hold exactly those answers at exactly the answer positions."""

import pytest
import torch

from nlc.spec import schema as s
from nlc.train.tasks import IGNORE, NEEDLE, PAD, QUERY, SEP, Task, make_task

SYMBOL = 4  # token of symbol 0 (docs/evaluation.md)


def draw(node, batch=64, extra=5, seed=0):
    task = make_task(node)
    context = task.min_context + extra
    tokens, targets = task.batch(torch.Generator().manual_seed(seed), batch, context)
    assert tokens.shape == targets.shape == (batch, context)
    assert tokens.dtype == targets.dtype == torch.int64
    assert tokens.min() >= 0 and tokens.max() < task.vocab
    return task, tokens.tolist(), targets.tolist()


def assert_padded(tokens, targets, end):
    assert all(t == PAD for t in tokens[end:]), "the example is followed by padding only"
    assert all(t == IGNORE for t in targets[end:])


def decode_mqar(tokens, targets, keys, queries, vocab):
    half = vocab // 2
    sep = tokens.index(SEP)
    assert sep == 2 * keys
    memory = {}
    for k, v in zip(tokens[0:sep:2], tokens[1:sep:2]):
        assert SYMBOL <= k < SYMBOL + half and SYMBOL + half <= v < SYMBOL + vocab
        assert k not in memory, "keys are distinct within a sequence"
        memory[k] = v
    expected = [IGNORE] * (sep + 1)
    asked = []
    for i in range(queries):
        q, a = tokens[sep + 1 + 2 * i], tokens[sep + 2 + 2 * i]
        assert a == memory[q], "the answer that follows a query is the value stored under its key"
        expected += [memory[q], IGNORE]
        asked.append(q)
    end = sep + 1 + 2 * queries
    assert targets[:end] == expected
    assert_padded(tokens, targets, end)
    return asked


@pytest.mark.parametrize("keys, queries, vocab", [(8, 8, 64), (3, 2, 8), (4, 9, 16), (1, 1, 4)])
def test_mqar_answers_are_the_stored_values(keys, queries, vocab):
    task, tokens, targets = draw(s.Mqar(keys=keys, queries=queries, vocab=vocab))
    assert task.vocab == SYMBOL + vocab
    for row_tokens, row_targets in zip(tokens, targets):
        asked = decode_mqar(row_tokens, row_targets, keys, queries, vocab)
        if queries <= keys:
            assert len(set(asked)) == queries, "queries are drawn without replacement when there are enough keys"


def decode_niah(tokens, targets, length):
    (needle,) = [i for i, t in enumerate(tokens[:length]) if t == NEEDLE]
    (query,) = [i for i, t in enumerate(tokens[:length]) if t == QUERY]
    key, value = tokens[needle + 1], tokens[needle + 2]
    assert SYMBOL <= key < SYMBOL + 32 and SYMBOL + 32 <= value < SYMBOL + 64
    assert needle < max(1, length // 4), "the needle is planted in the first quarter"
    assert query == length - 3 and tokens[query + 1] == key and tokens[query + 2] == value
    haystack = [t for i, t in enumerate(tokens[:length]) if not (needle <= i < needle + 3 or i >= query)]
    assert all(SYMBOL + 64 <= t < SYMBOL + 128 for t in haystack), "the haystack never holds a key, value or marker"
    assert targets[:length] == [value if i == length - 2 else IGNORE for i in range(length)]
    assert_padded(tokens, targets, length)


@pytest.mark.parametrize("length", [8, 9, 64, 300])
def test_niah_answer_is_the_needle_value(length):
    _, tokens, targets = draw(s.Niah(length=length), batch=32)
    for row_tokens, row_targets in zip(tokens, targets):
        decode_niah(row_tokens, row_targets, length)


def test_niah_evaluates_beyond_its_training_length():
    task = make_task(s.Niah(length=32))
    longer = task.at_length(1024)
    tokens, targets = longer.batch(torch.Generator().manual_seed(3), 4, 1024)
    for row_tokens, row_targets in zip(tokens.tolist(), targets.tolist()):
        decode_niah(row_tokens, row_targets, 1024)
    with pytest.raises(ValueError, match="at least 32 tokens"):
        task.batch(torch.Generator(), 1, 16)
    with pytest.raises(ValueError, match="at least 8"):
        task.at_length(7)


@pytest.mark.parametrize("length", [1, 5, 32])
def test_copy_targets_repeat_the_string(length):
    task, tokens, targets = draw(s.Copy(length=length))
    for row_tokens, row_targets in zip(tokens, targets):
        assert row_tokens[length] == SEP and SEP not in row_tokens[:length]
        string = row_tokens[:length]
        assert all(SYMBOL <= t < task.vocab for t in string)
        assert row_tokens[length + 1 : 2 * length + 1] == string
        assert row_targets[: 2 * length + 1] == [IGNORE] * length + string + [IGNORE]
        assert_padded(row_tokens, row_targets, 2 * length + 1)


@pytest.mark.parametrize("length", [1, 5, 40])
def test_parity_target_is_the_parity_of_the_bits(length):
    _, tokens, targets = draw(s.Parity(length=length), batch=400)
    seen_lengths = set()
    for row_tokens, row_targets in zip(tokens, targets):
        n = row_tokens.index(SEP)
        bits = [t - SYMBOL for t in row_tokens[:n]]
        assert 1 <= n <= length and set(bits) <= {0, 1}
        answer = SYMBOL + sum(bits) % 2
        assert row_tokens[n + 1] == answer
        assert row_targets[: n + 2] == [IGNORE] * n + [answer, IGNORE]
        assert_padded(row_tokens, row_targets, n + 2)
        seen_lengths.add(n)
    if length <= 5:
        assert seen_lengths == set(range(1, length + 1)), "string lengths are drawn from [1, length]"
    else:
        assert len(seen_lengths) > length // 2


NODES = [s.Mqar(), s.Niah(length=16), s.Copy(length=6), s.Parity(length=7)]


@pytest.mark.parametrize("node", NODES, ids=lambda n: n.kind)
def test_batches_depend_only_on_the_seed(node):
    task = make_task(node)
    context = task.min_context + 3
    a = task.batch(torch.Generator().manual_seed(7), 8, context)
    b = task.batch(torch.Generator().manual_seed(7), 8, context)
    c = task.batch(torch.Generator().manual_seed(8), 8, context)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    generator = torch.Generator().manual_seed(7)
    first, second = task.batch(generator, 8, context), task.batch(generator, 8, context)
    assert not torch.equal(first[0], second[0]), "a generator moves on: consecutive batches differ"


@pytest.mark.parametrize("node", NODES, ids=lambda n: n.kind)
def test_every_task_fits_a_byte_model(node):
    task = make_task(node)
    task.check_model(256, task.min_context)
    with pytest.raises(ValueError, match="vocab"):
        task.check_model(task.vocab - 1)
    with pytest.raises(ValueError, match="context"):
        task.check_model(256, task.min_context - 1)
    with pytest.raises(ValueError, match=f"at least {task.min_context}"):
        task.batch(torch.Generator(), 1, task.min_context - 1)


def test_mqar_refuses_more_keys_than_key_symbols():
    with pytest.raises(ValueError, match="vocab >= 20"):
        make_task(s.Mqar(keys=10, vocab=16))


def test_bytes_and_corpus_are_not_tasks():
    with pytest.raises(ValueError, match="not a synthetic task"):
        make_task(s.Corpus())


def test_accuracy_counts_answer_positions_only():
    task, _, targets = draw(s.Mqar(keys=4, queries=4, vocab=16), batch=6)
    targets = torch.tensor(targets)
    answers = targets != IGNORE
    perfect = torch.randn(6, targets.shape[1], task.vocab)  # wrong almost everywhere but at the answers
    perfect[answers] = torch.nn.functional.one_hot(targets[answers], task.vocab).float() * 100
    assert Task.accuracy(perfect, targets) == 1.0
    wrong_answer = perfect.clone()
    first = answers.nonzero()[:6]  # 6 of the 24 answers: make them wrong
    wrong_answer[first[:, 0], first[:, 1]] = -wrong_answer[first[:, 0], first[:, 1]]
    assert Task.accuracy(wrong_answer, targets) == pytest.approx(1 - 6 / answers.sum().item())
    with pytest.raises(ValueError, match="no answer"):
        Task.accuracy(perfect, torch.full_like(targets, IGNORE))
