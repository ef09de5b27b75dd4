"""Checkpoints: a round trip of weights (tied ones stored once), optimiser state and metadata;
load_model's spec check; a writer killed mid-save leaves a whole generation."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import nlc
from nlc.train.checkpoint import CheckpointError, load_model, read_checkpoint, save_checkpoint, spec_sha256

ROOT = Path(__file__).resolve().parents[2]


def meta_for(path, step=0, **extra):
    return {"spec_path": str(path), "spec_sha256": spec_sha256(path), "model_name": "tiny_attention", "step": step, **extra}


def test_round_trip_with_tied_weights_and_optimizer_state(spec, tmp_path):
    path = spec()
    torch.manual_seed(0)
    model = nlc.load(str(path))
    assert model.head.weight is model.embed.weight
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 256, (2, 8)))[0].square().mean().backward()
    optimizer.step()
    rng = torch.get_rng_state()
    save_checkpoint(tmp_path, model, optimizer.state_dict(), meta_for(path, step=7, rng={"torch": rng}, pair=(1, 2.5)))

    with safe_open(tmp_path / "checkpoint.safetensors", "pt") as f:
        names = set(f.keys())
    assert "embed.weight" in names and "head.weight" not in names  # the tied weight is stored once
    _, optimizer_state, meta = read_checkpoint(tmp_path)
    assert meta["step"] == 7 and meta["pair"] == (1, 2.5) and torch.equal(meta["rng"]["torch"], rng)
    restored = torch.optim.AdamW(nlc.load(str(path)).parameters(), lr=1e-3)
    restored.load_state_dict(optimizer_state)
    for saved, original in zip(restored.state_dict()["state"].values(), optimizer.state_dict()["state"].values()):
        assert all(torch.equal(saved[key], original[key]) for key in original)
    assert restored.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]

    loaded, loaded_meta = load_model(tmp_path)
    assert loaded_meta["step"] == 7 and loaded.head.weight is loaded.embed.weight
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    readable = json.loads((tmp_path / "checkpoint.json").read_text())
    assert readable["step"] == 7 and readable["spec_sha256"] == spec_sha256(path) and readable["weights"] == "checkpoint.safetensors"


def test_load_model_refuses_another_spec_and_bad_files(spec, tmp_path):
    path = spec()
    save_checkpoint(tmp_path / "run", nlc.load(str(path)), None, meta_for(path))
    other = spec("deltanet")
    with pytest.raises(CheckpointError, match="different spec"):
        load_model(tmp_path / "run", other)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_model(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "checkpoint.safetensors").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable nlc checkpoint"):
        read_checkpoint(tmp_path / "bad")


def test_a_change_to_a_used_file_is_a_different_spec(tmp_path):
    """The hash covers the files a spec `use`s: editing one of them makes the checkpoint refuse the spec."""
    base = (ROOT / "specs" / "deltanet.nl").read_text()
    (tmp_path / "base.nl").write_text(base)
    (tmp_path / "main.nl").write_text('use "base.nl"\n\nmodel small extends deltanet {\n  depth = 1\n}\n')
    main = tmp_path / "main.nl"
    before = spec_sha256(main)
    save_checkpoint(tmp_path / "run", nlc.load(str(main)), None, {**meta_for(main), "model_name": "small"})
    assert nlc.compile(str(main)).count(before) == 1  # the generated header states the same hash
    (tmp_path / "base.nl").write_text(base.replace("dim = ", "dim =  "))  # same meaning, different text
    assert spec_sha256(main) != before
    with pytest.raises(CheckpointError, match="different spec"):
        load_model(tmp_path / "run", main)


WRITER = """
import sys, torch
from nlc.train.checkpoint import save_checkpoint
model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 512))  # ~2 MB a generation
out = sys.argv[1]
for step in range(1, 100000):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(step)
    save_checkpoint(out, model, {"moment": torch.full((512, 512), float(step))}, {"step": step})
    if step == 2:
        print("ready", flush=True)
"""


def test_killing_the_writer_mid_save_leaves_a_whole_generation(tmp_path):
    """SIGKILL at several moments: each time the checkpoint loads, and weights, optimiser state and
    step all belong to the same generation."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    out = tmp_path / "run"
    last_step = 0
    for delay in (0.0, 0.05, 0.13):
        writer = subprocess.Popen([sys.executable, str(script), str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert writer.stdout.readline().strip() == "ready"
        time.sleep(delay)
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        state_dict, optimizer_state, meta = read_checkpoint(out)
        step = meta["step"]
        assert step >= 2
        assert all(bool((t == step).all()) for t in state_dict.values())
        assert bool((optimizer_state["moment"] == step).all())
        last_step = max(last_step, step)
    assert last_step >= 2
