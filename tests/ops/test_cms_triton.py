"""The CMS task-objective chunk-write kernel, run by the Triton interpreter on CPU, against the PyTorch ops of
`nlc/ops/cms/naive.py` (float64 and float32): every flag combination, several pieces folded, a whole CmsLayer
stream through the kernel, the custom op's registration and torch.compile, and the CPU dispatch."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on CPU tensors

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from nlc.ops.cms import dispatch, naive
from nlc.ops.cms import triton as triton_path
from nlc.runtime import CmsConfig, CmsLayer, CmsLevelConfig, Structure
from tests.ops.helpers import OnCuda

pytestmark = [pytest.mark.triton]

if not triton_path.INTERPRETED:
    raise RuntimeError("nlc.ops.cms.triton was imported before TRITON_INTERPRET=1 was set: run this file in a fresh process")

# odd sizes: the first weight fits one block with most lanes masked, the second spans two blocks, the last partial
SHAPES = ((2, 1, 12, 7), (2, 1, 33, 20))
LR, BETA = 0.3, 0.85
TOLERANCE = {torch.float64: {"rtol": 1e-12, "atol": 1e-12}, torch.float32: {"rtol": 1e-6, "atol": 1e-6}}


def weights(gen, dtype):
    return tuple(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for shape in SHAPES)


def level_state(dtype, momentum, has_pending, n_pieces, seed=0):
    gen = torch.Generator().manual_seed(seed)
    delta = weights(gen, dtype)
    mom = weights(gen, dtype) if momentum else None
    pending = weights(gen, dtype) if has_pending else None
    pieces = [weights(gen, dtype) for _ in range(n_pieces)]
    return delta, mom, pending, pieces


def assert_all_close(got, want, dtype):
    assert (got is None) == (want is None)
    if want is not None:
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape
            torch.testing.assert_close(g, w, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("momentum", [False, True], ids=["gd", "momentum"])
@pytest.mark.parametrize("has_pending", [False, True], ids=["fresh", "pending"])
@pytest.mark.parametrize("write_chunk", [False, True], ids=["fold", "write"])
@pytest.mark.parametrize("n_pieces", [1, 3, 6])  # 6 > MAX_PIECES: two launches, the pending sum carried between them
def test_matches_naive(dtype, momentum, has_pending, write_chunk, n_pieces, poison_empty):
    delta, mom, pending, pieces = level_state(dtype, momentum, has_pending, n_pieces)
    inputs = [t.clone() for group in (delta, mom or (), pending or (), *pieces) for t in group]
    got = triton_path.chunk_update(delta, mom, pending, pieces, LR, BETA, write_chunk)
    want = naive.chunk_update(delta, mom, pending, pieces, LR, BETA, write_chunk)
    for g, w in zip(got, want, strict=True):
        assert_all_close(g, w, dtype)
    if write_chunk:
        assert got[2] is None
    else:  # a fold leaves delta and momentum as they were
        assert got[0] is delta and got[1] is mom
    after = [t for group in (delta, mom or (), pending or (), *pieces) for t in group]
    assert all(torch.equal(a, b) for a, b in zip(after, inputs, strict=True))  # the inputs are never modified


@pytest.mark.parametrize("momentum", [False, True], ids=["gd", "momentum"])
def test_write_of_pending_alone_and_nothing_to_do(momentum):
    """A flush with no new piece writes the pending sum; no piece and no write (or nothing pending) changes nothing."""
    delta, mom, pending, _ = level_state(torch.float64, momentum, True, 0)
    got = triton_path.chunk_update(delta, mom, pending, [], LR, BETA, True)
    want = naive.chunk_update(delta, mom, pending, [], LR, BETA, True)
    for g, w in zip(got, want, strict=True):
        assert_all_close(g, w, torch.float64)
    for unchanged, write_chunk in ((pending, False), (None, True)):
        got = triton_path.chunk_update(delta, mom, unchanged, [], LR, BETA, write_chunk)
        assert got[0] is delta and got[1] is mom and got[2] is unchanged
    with pytest.raises(ValueError, match="nothing to fold"):
        triton_path.chunk_update_weight(delta[0], None, None, [], LR, BETA, True)


def stream_states(levels, variant):
    """A task-objective CmsLayer stream (forward, backward, learn; flush at the end) -> the states after each learn."""
    torch.manual_seed(0)
    layer = CmsLayer(CmsConfig(dim=6, levels=levels, variant=variant, objective="task")).double()
    x = torch.randn(2, 13, 6, dtype=torch.float64)
    state, states = None, []
    for start, stop in [(0, 3), (3, 4), (4, 9), (9, 13)]:  # pieces inside and across chunks of 2 and 4
        y, state = layer(x[:, start:stop], state)
        (0.1 * y.square().sum()).backward()
        state = layer.flush(state) if stop == 13 else layer.learn(state)
        states.append(state)
    return states


@pytest.mark.parametrize("variant", ["sequential", "nested"])
def test_cms_layer_stream_through_the_kernel(variant, monkeypatch):
    """CmsLayer.learn with the kernel chosen (as on a GPU) gives the PyTorch ops' states, write after write."""
    swiglu = Structure("mlp", depth=2, expand=1.5, act="swiglu")
    specs = (("fast", 2, "momentum"), ("slow", 4, "gd"))
    levels = tuple(CmsLevelConfig(name, swiglu, every=every, update=update, lr=0.1, beta=0.8) for name, every, update in specs)
    want = stream_states(levels, variant)
    calls = []

    def kernel_always(*args):
        calls.append(args)
        return triton_path

    monkeypatch.setattr(dispatch, "find_path", kernel_always)
    got = stream_states(levels, variant)
    assert calls
    for state_got, state_want in zip(got, want, strict=True):
        for level_got, level_want in zip(state_got.levels, state_want.levels, strict=True):
            for name in ("delta", "momentum", "pending"):
                assert_all_close(getattr(level_got, name), getattr(level_want, name), torch.float64)
    assert any(d.abs().sum() > 0 for level in got[-1].levels for d in level.delta)


def op_args(momentum, has_pending, write_chunk, n_pieces=2):
    delta, mom, pending, pieces = level_state(torch.float32, momentum, has_pending, n_pieces)
    return (delta[1], None if mom is None else mom[1], None if pending is None else pending[1], [p[1] for p in pieces], LR, BETA, write_chunk)


@pytest.mark.parametrize(("momentum", "has_pending", "write_chunk"), [(True, True, True), (False, False, True), (True, True, False), (False, False, False)])
def test_custom_op_registration(momentum, has_pending, write_chunk):
    """Schema (no input mutated, no output aliased), fake (meta) implementation, and no autograd formula needed."""
    torch.library.opcheck(triton_path.chunk_update_weight, op_args(momentum, has_pending, write_chunk))


def test_compiles_without_graph_breaks():
    """torch.compile traces the op as graph nodes (a fold then a write) and gives the eager results."""
    delta, mom, pending, pieces = level_state(torch.float64, True, True, 2)

    def fold_then_write(delta, mom, pending, first, second):
        delta, mom, pending = triton_path.chunk_update(delta, mom, pending, [first], LR, BETA, False)
        return triton_path.chunk_update(delta, mom, pending, [second], LR, BETA, True)

    compiled = torch.compile(fold_then_write, backend="aot_eager", fullgraph=True)
    eager = fold_then_write(delta, mom, pending, *pieces)
    traced = compiled(delta, mom, pending, *pieces)
    want = naive.chunk_update(delta, mom, pending, pieces, LR, BETA, True)
    for got_eager, got_traced, expected in zip(eager, traced, want, strict=True):
        assert_all_close(got_traced, got_eager, torch.float64)
        assert_all_close(got_eager, expected, torch.float64)


def test_never_chosen_on_cpu():
    delta, mom, pending, pieces = level_state(torch.float32, True, True, 2)
    assert not triton_path.supports(delta, mom, pending, pieces)  # CPU, even with TRITON_INTERPRET=1
    assert dispatch.find_path(delta, mom, pending, pieces) is naive
    if not torch.cuda.is_available():
        assert dispatch.kernel_module() is None  # Triton is not even imported for the dispatch


def test_supports_cuda_float32_and_float64_only():
    def on_cuda(dtype, shape_of_second_piece=None):
        delta, mom, pending, pieces = level_state(dtype, True, True, 2)
        if shape_of_second_piece is not None:
            pieces[1] = (pieces[1][0], torch.zeros(shape_of_second_piece, dtype=dtype))
        cast = [tuple(t.as_subclass(OnCuda) for t in group) for group in (delta, mom, pending, *pieces)]
        return cast[0], cast[1], cast[2], cast[3:]

    assert triton_path.supports(*on_cuda(torch.float32))
    assert triton_path.supports(*on_cuda(torch.float64))
    assert not triton_path.supports(*on_cuda(torch.bfloat16))
    assert not triton_path.supports(*on_cuda(torch.float32, shape_of_second_piece=(2, 1, 20, 33)))
    delta, mom, pending, pieces = on_cuda(torch.float32)
    assert not triton_path.supports(delta, mom, pending, [*pieces, tuple(t.as_subclass(torch.Tensor) for t in pieces[0])])  # one CPU piece
