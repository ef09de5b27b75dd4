"""Shared helpers for the reference checks: loading fla's pure-PyTorch references by file path, the memory
layer a catalogue spec compiles to (at a small width), and running that layer with its memory op replaced
by a reference. Conventions and tolerances are written down in docs/references.md."""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import sys
from pathlib import Path

import pytest
import torch

# importlib import mode puts nothing on sys.path: make `nlc` and `tests.ops.helpers` importable from anywhere
ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.ops.helpers import relative_rmse  # noqa: E402

# fla's naive references cast to float32 inside: compared with nlc in float64 by fla's relative-RMSE measure.
FLA_FLOAT32_RMSE = 1e-5


def load_fla_naive(package: str):
    """`fla/ops/<package>/naive.py` as a module, loaded by path: importing `fla.ops` pulls in Triton, which
    needs a GPU, while the naive references need only torch and einops. Skips when fla is absent."""
    spec = importlib.util.find_spec("fla")
    if spec is None:
        pytest.skip("flash-linear-attention (fla-core) is not installed: the fla reference checks need it")
    pytest.importorskip("einops", reason="fla's naive references import einops")
    path = pathlib.Path(spec.submodule_search_locations[0]) / "ops" / package / "naive.py"
    if not path.exists():
        pytest.skip(f"this fla version has no {path}")
    module_spec = importlib.util.spec_from_file_location(f"fla_{package}_naive", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def assert_rmse(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    err = relative_rmse(actual, expected)
    assert err <= tol, f"{what}: relative RMSE {err:.3e} > {tol:.0e}"


def nlc_memory(impl: str):
    """nlc's memory op with a chosen implementation: "naive" (the oracle) or "auto" (the fast path)."""
    from nlc.ops.memory.dispatch import memory_update

    def memory(q, k, v, gates, rule, state, sparams=None):
        return memory_update(q, k, v, gates, rule, state, sparams, impl=impl)

    return memory


def compiled_memory_layer(spec: str, dim: int = 16, heads: int = 2, seed: int = 0):
    """The `mix` memory layer of a catalogue spec's block, exactly as `nlc.load` builds it, at a small
    width, in float64."""
    import nlc

    torch.manual_seed(seed)
    model = nlc.load(str(ROOT / "specs" / spec))
    config = dataclasses.replace(model.config, dim=dim, heads=heads)
    return type(model.blocks[0])(config).mix.double()


def perturb_parameters(layer: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    """Move every parameter off its initial value (norm scales of 1, zero biases, zero initial states) so
    that each takes part in the comparison."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def layer_with_memory(layer, x: torch.Tensor, memory_fn, monkeypatch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The layer's output on x and the gradients of a fixed projection of it with respect to x and every
    layer parameter, with the layer's memory op replaced by `memory_fn(q, k, v, gates, rule, state, sparams)`
    (None: the layer's own op)."""
    import nlc.runtime.memory as runtime_memory

    calls = []
    if memory_fn is not None:

        def counted(*args, **kwargs):
            calls.append(1)
            return memory_fn(*args, **kwargs)

        monkeypatch.setattr(runtime_memory, "memory_update", counted)
    x = x.detach().requires_grad_()
    y, _ = layer(x)
    assert memory_fn is None or len(calls) == 1, f"the layer called its memory op {len(calls)} times, expected once"
    weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    leaves = [x, *layer.parameters()]
    grads = torch.autograd.grad((y * weight).sum(), leaves, allow_unused=True)
    monkeypatch.undo()
    return y.detach(), [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]


def assert_layer_matches(layer, x, reference_fn, monkeypatch, tol: float | None) -> None:
    """The layer with its own memory op and with `reference_fn` agree on output and every gradient: to
    float64 round-off (tol None) or within a relative RMSE `tol`."""
    y_ref, grads_ref = layer_with_memory(layer, x, reference_fn, monkeypatch)
    y, grads = layer_with_memory(layer, x, None, monkeypatch)
    names = ["x", *(n for n, _ in layer.named_parameters())]
    assert len(names) == len(grads)
    for name, actual, expected in [("output", y, y_ref), *zip(names, grads, grads_ref)]:
        if tol is None:
            torch.testing.assert_close(actual, expected, atol=1e-10, rtol=1e-8, msg=lambda m, name=name: f"{name}: {m}")
        else:
            assert_rmse(actual, expected, tol, name if name == "output" else f"grad of {name}")
