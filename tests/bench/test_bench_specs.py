"""The benchmark models: `specs/bench/` compiles, the compared models are size-matched, and the
optimiser comparison's training gives every optimiser the same start."""

import math
import warnings

import pytest

import nlc
from bench.compare import MODELS, SPECS
from bench.optimizers import TRAIN_GRIDS, TRAIN_NAMES, compare, grid, make_train_corpus

CATALOGUE_FILE = {"titans_learned_lr": "titans.nl"}  # variants not named after their catalogue file


def parameter_count(name: str) -> int:
    spec_file, model_name = MODELS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = nlc.load(str(SPECS / spec_file), model_name)
    return sum(p.numel() for p in model.parameters())


def test_compared_models_are_within_ten_percent_in_size():
    counts = {name: parameter_count(name) for name in MODELS}
    assert max(counts.values()) <= 1.1 * min(counts.values()), counts


@pytest.mark.parametrize("name", list(MODELS))
def test_compared_model_is_its_catalogue_model_resized(name):
    """Each variant keeps its catalogue model's sequence mixer: the sub-layer kinds of a block match."""
    spec_file, model_name = MODELS[name]
    catalogue = SPECS.parent / CATALOGUE_FILE.get(name, spec_file)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        variant = nlc.load(str(SPECS / spec_file), model_name)
        original = nlc.load(str(catalogue))
    kinds = lambda model: [type(layer).__name__ for layer in model.blocks[0].children()]  # noqa: E731
    assert kinds(variant) == kinds(original)


def test_optimiser_runs_start_from_the_same_weights_and_batches():
    """Two optimisers with a zero learning rate leave the same initial weights: their validation is equal."""
    train_corpus = make_train_corpus(steps=2, batch=2, context=16, seed=0, eval_every=1)
    rows = compare(["adamw", "muon"], train_corpus, {"adamw": grid(lr=[0.0]), "muon": grid(lr=[0.0], adamw_lr=[0.0])})
    first = [row["curve"][0][1] for row in rows]  # [2]
    assert all(math.isfinite(v) for v in first)
    assert first[0] == first[1]
    assert rows[0]["train_bits"] == rows[1]["train_bits"]


@pytest.mark.parametrize("name", TRAIN_NAMES)
def test_each_optimiser_lowers_the_validation_loss_of_the_small_model(name):
    train_corpus = make_train_corpus(steps=8, batch=4, context=32, seed=0, eval_every=1)
    kwargs = TRAIN_GRIDS[name][-1]  # the largest learning rate of the grid
    (row,) = compare([name], train_corpus, {name: [kwargs]})
    assert row["diverged"] is None and len(row["curve"]) == 8
    first, last = row["curve"][0][1], row["curve"][-1][1]
    assert math.isfinite(last) and last < first
