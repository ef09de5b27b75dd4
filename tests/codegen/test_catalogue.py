"""Every catalogue model, compiled, at a tiny size: runs, learns, streams, is causal, and survives a
checkpoint round trip through safetensors into a rebuilt module; at its own size, reads real text and random
bytes without blowing up."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_model, save_model

import nlc
from nlc.codegen import camel
from nlc.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
CATALOGUE = sorted((ROOT / "specs").glob("*.nl"))
TINY = {"vocab": 64, "dim": 32, "heads": 2, "depth": 1}
T = 20


def model_name(path: Path) -> str:
    spec, diagnostics, _ = load_spec(str(path))
    assert not diagnostics
    return next(d.name for d in spec.decls if d.decl == "model")


def generated_module(name: str):
    spec = importlib.util.spec_from_file_location(f"generated_{name}", ROOT / "generated" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny(module, name: str, seed: int = 0) -> torch.nn.Module:
    config = getattr(module, f"{camel(name)}Config")(**TINY)
    torch.manual_seed(seed)
    return getattr(module, camel(name))(config).double()


@pytest.fixture(params=CATALOGUE, ids=lambda p: p.stem)
def built(request):
    name = model_name(request.param)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the oracle fallback announces itself; not what these tests check
        yield name, generated_module(name)


def tokens(seed: int, t: int = T) -> torch.Tensor:
    return torch.randint(0, TINY["vocab"], (2, t), generator=torch.Generator().manual_seed(seed))


def test_forward_backward_every_parameter_learns(built):
    name, module = built
    model = tiny(module, name)
    logits, _ = model(tokens(1))
    assert logits.shape == (2, T, TINY["vocab"])
    assert torch.isfinite(logits).all()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, TINY["vocab"]), tokens(1)[:, 1:].reshape(-1))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no (finite) gradient for {missing}"


def test_stream_in_pieces_equals_one_call(built):
    name, module = built
    model = tiny(module, name)
    x = tokens(2)
    with torch.no_grad():
        whole, _ = model(x)
        first, state = model(x[:, :7])
        second, state = model(x[:, 7:13], state)
        third, _ = model(x[:, 13:], state)
    torch.testing.assert_close(torch.cat([first, second, third], 1), whole, rtol=1e-9, atol=1e-9)


def test_causal(built):
    name, module = built
    model = tiny(module, name)
    x = tokens(3)
    y = x.clone()
    y[:, 11:] = (y[:, 11:] + 1) % TINY["vocab"]
    with torch.no_grad():
        a, _ = model(x)
        b, _ = model(y)
    torch.testing.assert_close(a[:, :11], b[:, :11], rtol=0, atol=0)
    assert not torch.allclose(a[:, 11:], b[:, 11:])


def test_checkpoint_round_trip_after_rebuild(built, tmp_path):
    name, module = built
    model = tiny(module, name, seed=5)
    path = tmp_path / "model.safetensors"
    save_model(model, str(path))
    rebuilt = tiny(generated_module(name), name, seed=6)  # a fresh import of the same file, other weights
    load_model(rebuilt, str(path))
    x = tokens(4)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x)[0], model(x)[0], rtol=0, atol=0)


def test_generated_file_and_nlc_load_agree(built, monkeypatch):
    name, module = built
    monkeypatch.chdir(ROOT)
    path = next(p for p in CATALOGUE if model_name(p) == name)
    torch.manual_seed(7)
    loaded = nlc.load(str(path.relative_to(ROOT)))
    torch.manual_seed(7)
    from_file = getattr(module, camel(name))()
    assert [n for n, _ in loaded.named_parameters()] == [n for n, _ in from_file.named_parameters()]
    for (n, a), (_, b) in zip(loaded.state_dict().items(), from_file.state_dict().items()):
        assert torch.equal(a, b), n


@pytest.fixture(scope="module")
def python_source() -> torch.Tensor:
    """Four windows of 256 bytes of the built-in corpus (the standard library's Python source)."""
    from nlc.train.data import corpus_files

    text = b"".join(f.read_bytes() for f in corpus_files()[:40])
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    starts = torch.randint(0, len(data) - 256, (4,), generator=torch.Generator().manual_seed(0))
    return data[starts[:, None] + torch.arange(256)]  # [4, 256]


@pytest.mark.parametrize("path", CATALOGUE, ids=lambda p: p.stem)
def test_full_size_model_reads_real_text_and_random_bytes_finitely(path, python_source):
    """At the spec's own size and default gates, before any training: the in-context memories must not blow
    up on alike tokens (real text) or on noise (OmegaNet's window once did at its first forward)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = nlc.load(str(path))
    random_bytes = torch.randint(0, 256, (4, 256), generator=torch.Generator().manual_seed(1))
    for x in (python_source, random_bytes):
        with torch.no_grad():
            logits, _ = model(x)
        assert torch.isfinite(logits).all() and logits.abs().max() < 1e3
