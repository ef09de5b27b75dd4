"""Shared helpers for op tests: random inputs for any rule, streaming in pieces, comparison of outputs and of
the gradients of every input, NaN-poisoned fresh buffers, and a hypothesis strategy over rules.

    from tests.ops.helpers import random_inputs, assert_close_with_grads
    inputs = random_inputs(rule, B=2, H=2, T=8, dk=4, dv=4)
    assert_close_with_grads(memory_naive, chunk.apply, inputs)

`inputs` is a dict with the keyword names every op takes: q, k, v, gates, rule, state, sparams.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

from nlc.ops.memory.dispatch import memory_update
from nlc.ops.memory.naive import gates_used, memory_naive, named_tensors
from nlc.ops.memory.rule import Gates, MemoryState, Rule, Structure, StructureParams
from nlc.ops.memory.structure import weight_shapes

GATE_RANGES = {  # kept away from 0 and 1 so every path through the rule stays exercised
    "lr": (0.1, 0.9),
    "beta": (0.3, 0.9),
    "alpha": (0.6, 1.0),
    "lam": (0.0, 0.3),
    "delta": (0.1, 0.8),  # residuals are O(1): huber takes both branches
}


def random_inputs(
    rule: Rule,
    B: int = 2,
    H: int = 2,
    T: int = 6,
    dk: int = 4,
    dv: int = 4,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    per_channel: bool | tuple[str, ...] = False,
    zero_state: bool = False,
) -> dict:
    """Leaf tensors (requires_grad) for one call of a memory op, as a dict of its keyword arguments.

    Keys and queries are l2-normalised, gates drawn in GATE_RANGES (only those the rule uses). The initial
    state is random (zeros with `zero_state`), with a random momentum when the update keeps one.
    `per_channel`: True or the names of gates drawn `[B, H, T, dk]` (matrix memories; delta never is).
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=dtype) * scale

    def leaf(x):
        return x.detach().requires_grad_()

    q = leaf(F.normalize(randn(B, H, T, dk), dim=-1))
    k = leaf(F.normalize(randn(B, H, T, dk), dim=-1))
    v = leaf(randn(B, H, T, dv))

    gates = Gates()
    for name in gates_used(rule):
        wide = name != "delta" and (per_channel is True or (per_channel and name in per_channel))
        low, high = GATE_RANGES[name]
        u = torch.rand(B, H, T, *((dk,) if wide else ()), generator=gen, dtype=dtype)
        setattr(gates, name, leaf(low + (high - low) * u))

    shapes = weight_shapes(rule.structure, dk, dv)
    if zero_state:
        weights = tuple(torch.zeros(B, H, *s, dtype=dtype) for s in shapes)
    elif rule.structure.kind == "matrix":
        weights = (randn(B, H, dv, dk, scale=0.3),)
    else:
        weights = tuple(randn(B, H, out, inp, scale=1 / math.sqrt(inp)) for out, inp in shapes)
    momentum = None
    if rule.update in ("momentum", "muon"):
        momentum = tuple(torch.zeros_like(w) if zero_state else randn(*w.shape, scale=0.1) for w in weights)
    state = MemoryState(
        weights=tuple(leaf(w) for w in weights),
        momentum=None if momentum is None else tuple(leaf(m) for m in momentum),
    )

    sparams = None
    if rule.structure.kind != "matrix" and rule.structure.norm != "none":
        sparams = StructureParams(norm_weight=leaf(1 + randn(H, dv, scale=0.1)))
        if rule.structure.norm == "layer":
            sparams.norm_bias = leaf(randn(H, dv, scale=0.1))
    return {"q": q, "k": k, "v": v, "gates": gates, "rule": rule, "state": state, "sparams": sparams}


def slice_gates(gates: Gates, start: int, stop: int) -> Gates:
    return Gates(**{name: None if g is None else g[:, :, start:stop] for name, g in vars(gates).items()})


def run_in_pieces(fn, inputs: dict, cuts) -> tuple[torch.Tensor, MemoryState]:
    """Call `fn(**inputs)` on consecutive pieces of the sequence split at `cuts`, carrying the state;
    returns the concatenated reads and the last state (compare with one call: they must agree)."""
    T = inputs["q"].shape[2]
    bounds = [0, *sorted(c for c in cuts if 0 < c < T), T]
    state, outs = inputs["state"], []
    for start, stop in itertools.pairwise(bounds):
        piece = dict(inputs, state=state, gates=slice_gates(inputs["gates"], start, stop))
        for name in ("q", "k", "v"):
            piece[name] = inputs[name][:, :, start:stop]
        o, state = fn(**piece)
        outs.append(o)
    return torch.cat(outs, dim=2), state


def assert_same_structure(out_a, out_b) -> None:
    """Same pos and same presence of every state field (a fast path shares the oracle's state format)."""
    if isinstance(out_a, (tuple, list)):
        assert len(out_a) == len(out_b), f"{len(out_a)} outputs vs {len(out_b)}"
        for a, b in zip(out_a, out_b):
            assert_same_structure(a, b)
    elif isinstance(out_a, MemoryState):
        assert isinstance(out_b, MemoryState), f"a MemoryState vs {type(out_b).__name__}"
        assert out_a.pos == out_b.pos, f"state.pos {out_a.pos} vs {out_b.pos}"
    names_a = [n for n, _ in named_tensors(out_a)]
    names_b = [n for n, _ in named_tensors(out_b)]
    assert names_a == names_b, f"outputs differ in structure:\n{names_a}\n{names_b}"


def assert_close_with_grads(fn_a, fn_b, inputs: dict, atol: float = 1e-9, rtol: float = 1e-7, seed: int = 0) -> None:
    """fn_a(**inputs) and fn_b(**inputs) agree on every output tensor (reads and every state field) and on
    the gradients of a fixed random projection of those outputs with respect to every leaf input."""
    leaves = [(n, t) for n, t in named_tensors(inputs) if t.requires_grad]
    results = []
    for fn in (fn_a, fn_b):
        out = fn(**inputs)
        named = named_tensors(out)
        gen = torch.Generator().manual_seed(seed)
        loss = sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum() for _, t in named if t.requires_grad)
        grads = [None] * len(leaves)
        if torch.is_tensor(loss):
            grads = torch.autograd.grad(loss, [t for _, t in leaves], allow_unused=True)
        results.append((out, named, [torch.zeros_like(t) if g is None else g for (_, t), g in zip(leaves, grads)]))

    (out_a, named_a, grads_a), (out_b, named_b, grads_b) = results
    assert_same_structure(out_a, out_b)
    for (name, a), (_, b) in zip(named_a, named_b):
        torch.testing.assert_close(b, a, atol=atol, rtol=rtol, msg=lambda m, name=name: f"output {name}: {m}")
    for (name, _), a, b in zip(leaves, grads_a, grads_b):
        torch.testing.assert_close(b, a, atol=atol, rtol=rtol, msg=lambda m, name=name: f"grad of {name}: {m}")


def relative_rmse(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """RMS of the difference over the RMS of the expected tensor (fla's float32 comparison)."""
    diff = (actual.double() - expected.double()).square().mean().sqrt()
    return (diff / expected.double().square().mean().sqrt().clamp_min(1e-12)).item()


def cast(inputs: dict, dtype) -> dict:
    """The same inputs as fresh leaves of another dtype."""

    def leaf(x):
        return None if x is None else x.detach().to(dtype).requires_grad_()

    def leaves(xs):
        return None if xs is None else tuple(leaf(x) for x in xs)

    state, sparams = inputs["state"], inputs["sparams"]
    return dict(
        inputs,
        q=leaf(inputs["q"]),
        k=leaf(inputs["k"]),
        v=leaf(inputs["v"]),
        gates=Gates(**{name: leaf(g) for name, g in vars(inputs["gates"]).items()}),
        state=state.replace(weights=leaves(state.weights), momentum=leaves(state.momentum)),
        sparams=None if sparams is None else type(sparams)(leaf(sparams.norm_weight), leaf(sparams.norm_bias)),
    )


def switched_off(module, fn):
    """`fn` run with `module.ENABLED` off: a hand-written path's own fallback, the autograd loop."""

    def run(**inputs):
        module.ENABLED = False
        try:
            return fn(**inputs)
        finally:
            module.ENABLED = True

    return run


def record_calls(monkeypatch, module, name: str) -> list[int]:
    """The tokens (axis 2 of the first argument) of every call to `module.name` while the test runs."""
    calls, original = [], getattr(module, name)

    def counting(*args, **kwargs):
        calls.append(args[0].shape[2])
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return calls


def assert_partial_losses_agree(fn_a, fn_b, inputs: dict, used: str) -> None:
    """The gradients of every leaf input agree when only the reads (`used = "reads"`) or only the final
    weights and momentum (`"state"`) reach the loss."""
    leaves = [t for _, t in named_tensors(inputs) if t.requires_grad]
    grads = []
    for fn in (fn_a, fn_b):
        o, final = fn(**inputs)
        loss = o.square().sum() if used == "reads" else sum(w.square().sum() for w in (*final.weights, *(final.momentum or ())))
        grads.append(torch.autograd.grad(loss, leaves, allow_unused=True))
    for a, b in zip(*grads):
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(b, a, atol=1e-9, rtol=1e-7)


def assert_float32_close_to_float64(fn, inputs: dict, tolerance: float = 1e-4) -> None:
    """fn in float32 against itself in float64: reads, final weights and the gradients of every input within
    `tolerance` relative RMSE."""
    results = []
    for dtype in (torch.float64, torch.float32):
        typed = cast(inputs, dtype)
        o, state = fn(**typed)
        loss = (o * torch.linspace(-1, 1, o.shape[-1], dtype=dtype)).sum() + sum(w.sum() for w in state.weights)
        leaves = [t for _, t in named_tensors(typed) if t.requires_grad]
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        results.append([o, *state.weights, *(g for g in grads if g is not None)])
    for expected, actual in zip(*results):
        assert actual.dtype == torch.float32
        assert relative_rmse(actual, expected) < tolerance


class OnCuda(torch.Tensor):
    """A CPU tensor that answers is_cuda = True: a kernel's supports() judged as it would be on a GPU."""

    @property
    def is_cuda(self):
        return True


def handover(first, second, cut: int):
    """An op that runs `first` on the tokens before `cut` and `second` on the rest, carrying the state: two
    paths that share the state format hand a stream over mid-window or mid-chunk."""

    def run(q, k, v, gates, rule, state, sparams):
        o1, state = first(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], slice_gates(gates, 0, cut), rule, state, sparams)
        T = q.shape[2]
        o2, state = second(q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], slice_gates(gates, cut, T), rule, state, sparams)
        return torch.cat([o1, o2], dim=2), state

    return run


def assert_empty_call_keeps_the_state(fn, inputs: dict) -> None:
    """fn on zero tokens returns empty reads and the state the oracle returns (the given one, completed)."""
    o, state = fn(**inputs)
    expected_o, expected = memory_naive(**inputs)
    assert o.shape == expected_o.shape and o.shape[2] == 0
    assert [n for n, _ in named_tensors(state)] == [n for n, _ in named_tensors(expected)]
    for (name, a), (_, b) in zip(named_tensors(state), named_tensors(expected)):
        torch.testing.assert_close(a, b, msg=name)


def assert_dispatch_takes_a_fast_path(inputs: dict) -> None:
    """`memory_update` runs these inputs without the oracle fallback's warning, and agrees with the oracle."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the oracle fallback would warn
        o, _ = memory_update(**inputs)
    torch.testing.assert_close(o, memory_naive(**inputs)[0])


EXTREME_GATES = {"lr": 1.0, "beta": 1.0, "alpha": 0.0, "lam": 1.0, "delta": 1e-3}


def assert_finite_with_extreme_gates(fn, inputs: dict) -> None:
    """Every other token's gates at the ends of their ranges (a retention of exactly 0 included) and the first
    five values zero: fn's reads, state and the gradients of every input stay finite."""
    for name, gate in vars(inputs["gates"]).items():
        if gate is not None:
            gate.data[..., ::2] = EXTREME_GATES[name]
    inputs["v"].data[:, :, :5] = 0
    o, state = fn(**inputs)
    loss = o.square().sum() + sum(t.square().sum() for _, t in named_tensors(state) if t.requires_grad)
    leaves = [t for _, t in named_tensors(inputs) if t.requires_grad]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    for _, t in named_tensors((o, state)):
        assert torch.isfinite(t).all()
    for g in grads:
        assert g is None or torch.isfinite(g).all()


@contextlib.contextmanager
def poisoned_empty():
    """Fresh buffers from torch.empty / empty_like / Tensor.new_empty are filled with NaN (floats), so an op
    that reads memory it never wrote produces NaN instead of plausible garbage."""
    originals = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() or t.is_complex() else t

    def empty(*args, **kwargs):
        return poison(originals[0](*args, **kwargs))

    def empty_like(*args, **kwargs):
        return poison(originals[1](*args, **kwargs))

    def new_empty(self, *args, **kwargs):
        return poison(originals[2](self, *args, **kwargs))

    torch.empty, torch.empty_like, torch.Tensor.new_empty = empty, empty_like, new_empty
    try:
        yield
    finally:
        torch.empty, torch.empty_like, torch.Tensor.new_empty = originals


@st.composite
def rules(
    draw,
    kinds=("matrix", "linear", "mlp"),
    objectives=("dot", "l2", "lp", "huber"),
    retentions=("none", "decay", "weight_decay"),
    updates=("gd", "momentum", "dgd", "muon"),
    windows=(1, 2, 3),
    batches=(1, 2, 3),
    everies=(1, 2, 3),
    targets=("values", "self"),
    grads=("full", "stop"),
):
    """A random Rule over the given choices; `every` and `batch` are drawn compatible (batch divides every)."""
    kind = draw(st.sampled_from(kinds))
    structure = Structure(kind=kind)
    if kind != "matrix":
        structure = Structure(
            kind=kind,
            depth=draw(st.integers(1, 3)) if kind == "mlp" else 1,
            expand=draw(st.sampled_from([1.0, 1.5, 2.0])),
            act=draw(st.sampled_from(["gelu", "silu", "relu", "swiglu"])),
            residual=draw(st.booleans()),
            norm=draw(st.sampled_from(["none", "layer", "rms"])),
        )
    every = draw(st.sampled_from(everies))
    batch = draw(st.sampled_from([b for b in batches if every % b == 0] or [1]))
    return Rule(
        structure=structure,
        objective=draw(st.sampled_from(objectives)),
        p=draw(st.sampled_from([1.5, 3.0])),
        window=draw(st.sampled_from(windows)),
        targets=draw(st.sampled_from(targets)),
        retention=draw(st.sampled_from(retentions)),
        update=draw(st.sampled_from(updates)),
        ns_steps=draw(st.sampled_from([1, 3])),
        batch=batch,
        every=every,
        grad=draw(st.sampled_from(grads)),
    )
