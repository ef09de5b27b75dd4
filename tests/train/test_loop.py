"""The training loop: the loss goes down, resuming repeats the uninterrupted run bit for bit, the
task-objective CMS loop learns per sequence, the NaN guard names the layer, the schedule's shape."""

import itertools
import json
import math

import pytest
import torch

import nlc
from nlc.spec.schema import ConstantSchedule, Cosine, Mqar
from nlc.train import Diverged, Options, TrainError, train
from nlc.train.checkpoint import read_checkpoint, save_checkpoint
from nlc.train.data import make_data
from nlc.train.loop import first_nonfinite, lr_factor, sequence_loss, task_chunk


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out):
    return read_checkpoint(out)[0]


def test_loss_decreases_and_outputs_are_written(spec, tmp_path):
    out = tmp_path / "run"
    result = train(Options(spec=str(spec()), out=str(out), progress=False), log=None)
    logged = rows(out)
    assert [row["step"] for row in logged] == list(range(1, 13))
    for row in logged:
        assert {"step", "loss", "lr", "tokens_per_s", "grad_norm"} <= row.keys()
        assert all(math.isfinite(row[key]) for key in ("loss", "lr", "tokens_per_s", "grad_norm"))
    evaluated = [row for row in logged if "val_bpb" in row]
    assert [row["step"] for row in evaluated] == [6, 12]
    assert logged[0]["loss"] == pytest.approx(math.log(256), rel=0.05)  # an untrained byte model is uniform
    assert sum(row["loss"] for row in logged[-3:]) < sum(row["loss"] for row in logged[:3]) - 0.3
    assert evaluated[1]["val_bpb"] < evaluated[0]["val_bpb"] < math.log2(256) * 1.05
    assert result.loss == logged[-1]["loss"] and result.val_bpb == evaluated[-1]["val_bpb"]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((out / "checkpoint.json").read_text())
    assert meta["step"] == 12 and meta["model_name"] == "tiny_attention" and meta["settings"]["context"] == 32


@pytest.mark.parametrize(
    ("mixer", "update", "train_level"),
    [
        ("attention", "adamw(lr: 3e-3)", ""),
        ("cms", "adamw(lr: 3e-3)", ""),
        # an outer level that steps every 2 steps on accumulated gradients, under a main optimiser from nlc.optim
        ("attention", "muon(lr: 2e-2)", 'level slow { params = ["*.ffn.*"]; every = 2 steps; update = adamw(lr: 1e-3) }'),
        ("attention", "deep_momentum(lr: 1e-2)", ""),
    ],
)
def test_resume_repeats_the_uninterrupted_run_exactly(spec, tmp_path, mixer, update, train_level):
    path = str(spec(mixer, train=train_level, update=update))
    train(Options(spec=path, out=str(tmp_path / "whole"), steps=8, eval_every=4, progress=False), log=None)
    train(Options(spec=path, out=str(tmp_path / "parts"), steps=8, until=3, eval_every=4, progress=False), log=None)
    assert read_checkpoint(tmp_path / "parts")[2]["step"] == 3
    train(Options(spec=path, out=str(tmp_path / "parts"), resume=True, progress=False), log=None)
    whole, parts = rows(tmp_path / "whole"), rows(tmp_path / "parts")
    assert [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in whole] == [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in parts]
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "parts")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_different_spec(spec, tmp_path):
    path = spec()
    train(Options(spec=str(path), out=str(tmp_path / "run"), until=1, progress=False), log=None)
    path.write_text(path.read_text().replace("batch = 4", "batch = 2"))
    with pytest.raises(TrainError, match="different spec"):
        train(Options(spec=str(path), out=str(tmp_path / "run"), resume=True, progress=False), log=None)


def test_task_cms_learns_in_context_per_sequence(spec):
    """Pieces of the fastest chunk; each sequence's levels learn from that sequence's own loss only, so a
    batch of two gives the sum of the two sequences alone, and the levels' writes change later pieces."""
    torch.manual_seed(0)
    model = nlc.load(str(spec("cms"))).double()
    assert task_chunk(model) == 8
    tokens = torch.randint(0, 256, (2, 32))
    targets = torch.randint(0, 256, (2, 32))

    def loss(rows, chunk=8):
        model.zero_grad()
        return sequence_loss(model, model, tokens[rows], targets[rows], chunk, lambda: torch.autocast("cpu", enabled=False))

    together, first, second = loss(slice(0, 2)), loss(slice(0, 1)), loss(slice(1, 2))
    assert torch.allclose(together, first + second, rtol=1e-12, atol=0)
    # chunk = None: one forward over the whole sequence, the levels never write
    frozen = loss(slice(0, 1), chunk=None)
    assert not torch.allclose(first, frozen, rtol=1e-6, atol=0)
    with torch.no_grad():  # the first piece reads the initial levels in both cases
        logits, _ = model(tokens[:1, :8])
        first_piece = torch.nn.functional.cross_entropy(logits[0], targets[0, :8], reduction="sum")
    model.zero_grad()
    only_first = sequence_loss(model, model, tokens[:1, :8], targets[:1, :8], 8, lambda: torch.autocast("cpu", enabled=False))
    assert torch.allclose(only_first, first_piece, rtol=1e-12, atol=0)


def test_nonfinite_state_stops_with_the_layer_and_keeps_the_checkpoint(spec, tmp_path):
    path = spec("deltanet")
    out = tmp_path / "run"
    train(Options(spec=str(path), out=str(out), until=2, progress=False), log=None)
    state_dict, optimizer_state, meta = read_checkpoint(out)
    model = nlc.load(str(path))
    model.load_state_dict(state_dict)
    with torch.no_grad():
        model.blocks[0].mix.sources.key.proj.weight.fill_(float("inf"))  # the memory's keys, hence its state
    save_checkpoint(out, model, optimizer_state, meta)
    before = (out / "checkpoint.safetensors").read_bytes()
    with pytest.raises(Diverged, match=r"step 3: .*state of layer blocks\.0\.mix.*last good checkpoint"):
        train(Options(spec=str(path), out=str(out), resume=True, progress=False), log=None)
    assert (out / "checkpoint.safetensors").read_bytes() == before
    assert first_nonfinite(model, torch.zeros(1, 8, dtype=torch.long), None, None).startswith("the state of layer blocks.0.mix")


def test_schedule_warmup_then_cosine_to_min_lr():
    cosine = Cosine(warmup=4, min_lr=0.1)
    assert [lr_factor(cosine, step, 20) for step in (1, 2, 4)] == [0.25, 0.5, 1.0]
    assert lr_factor(cosine, 20, 20) == pytest.approx(0.1)
    assert lr_factor(cosine, 12, 20) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    factors = [lr_factor(cosine, step, 20) for step in range(4, 21)]
    assert all(a >= b for a, b in itertools.pairwise(factors))
    constant = ConstantSchedule(warmup=2)
    assert [lr_factor(constant, step, 10) for step in (1, 2, 3, 10)] == [0.5, 1.0, 1.0, 1.0]


def test_first_logged_loss_is_the_mean_over_answer_tokens_of_a_task(spec, tmp_path):
    """The logged loss is the cross-entropy averaged over the targets that count (-100 elsewhere), of the
    model that the seed builds, on the first batch that the seed draws."""
    path = spec(train="data = mqar(keys: 4, queries: 4, vocab: 16)")
    train(Options(spec=str(path), out=str(tmp_path / "run"), steps=2, eval_every=2, progress=False), log=None)
    first = rows(tmp_path / "run")[0]
    torch.manual_seed(0)
    model = nlc.load(str(path))
    data = make_data(Mqar(keys=4, queries=4, vocab=16), context=32)
    tokens, targets = data.batch(torch.Generator().manual_seed(0), 4, 32)
    assert 0 < int((targets != -100).sum()) < targets.numel()
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(tokens)[0].flatten(0, 1), targets.flatten(), ignore_index=-100)
    assert first["loss"] == pytest.approx(float(expected), rel=1e-5)
