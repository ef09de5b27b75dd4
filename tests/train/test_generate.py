"""Generation: with the state carried token by token it computes what re-running the whole prefix at
every step computes (logits and greedy tokens), sampling honours temperature and top-k, and
`nlc generate` prints the prompt and its continuation or refuses bad input with exit code 2."""

from pathlib import Path

import pytest
import torch

import nlc
from nlc.cli import main
from nlc.train.checkpoint import save_checkpoint, spec_sha256
from nlc.train.generate import generate, sample_next

# Beyond the shared tiny specs (conftest.py): a deep memory whose mini-batches straddle the calls, and
# a cms that learns in the forward pass every 3 tokens.
MORE_SPECS = {
    "titans": "memory mix {\n      structure = mlp(depth: 2, expand: 1, residual: true)\n      update = momentum\n      batch = 4 tokens\n    }",
    "l2_cms": "memory mix {}\n    cms continuum {\n      objective = l2\n      level fast { structure = mlp(expand: 1); every = 3 tokens }\n    }",
}


def tiny_model_path(spec, tmp_path: Path, mixer: str) -> Path:
    if mixer not in MORE_SPECS:
        return spec(mixer)
    path = tmp_path / f"{mixer}.nl"
    block = MORE_SPECS[mixer]
    path.write_text(f"model {mixer} {{\n  vocab = 256\n  dim = 32\n  depth = 1\n  heads = 2\n  context = 32\n  block {{\n    {block}\n  }}\n}}\n")
    return path


@torch.no_grad()
def greedy_by_rerunning(model, prompt, tokens):
    """The reference: every step runs the model on the whole sequence so far, from a fresh state."""
    sequence, logits_seen = prompt, []
    for _ in range(tokens):
        logits = model(sequence)[0][:, -1]  # [B, V]
        logits_seen.append(logits)
        sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
    return sequence[:, prompt.shape[1] :], torch.stack(logits_seen, dim=1)


@pytest.mark.parametrize("mixer", ["attention", "deltanet", "cms", *MORE_SPECS])
def test_carried_state_equals_rerunning_the_prefix(spec, tmp_path, mixer, monkeypatch):
    torch.manual_seed(0)
    model = nlc.load(str(tiny_model_path(spec, tmp_path, mixer))).double().eval()
    prompt = torch.randint(256, (2, 5))
    expected_tokens, expected_logits = greedy_by_rerunning(model, prompt, 12)
    seen = []
    original = model.forward
    monkeypatch.setattr(model, "forward", lambda tokens, state=None: seen.append(tokens.shape[1]) or original(tokens, state))
    out = generate(model, prompt, 12, temperature=0)
    assert seen == [5] + [1] * 11, "the prompt is read once, then one token per call"
    assert torch.equal(out, expected_tokens)
    # The logits each step sampled from: the carried-state run's, recomputed along the same tokens.
    monkeypatch.undo()
    with torch.no_grad():
        logits, state = model(prompt)
        carried = [logits[:, -1]]
        for i in range(11):
            logits, state = model(out[:, i : i + 1], state)
            carried.append(logits[:, -1])
    torch.testing.assert_close(torch.stack(carried, dim=1), expected_logits, rtol=1e-9, atol=1e-9)


def test_greedy_and_top_1_take_the_argmax():
    logits = torch.randn(5, 50)
    assert torch.equal(sample_next(logits, 0, None, None), logits.argmax(-1))
    assert torch.equal(sample_next(logits, 3.0, 1, torch.Generator().manual_seed(0)), logits.argmax(-1))


def test_top_k_samples_only_the_k_likeliest():
    logits = torch.randn(1, 50).expand(4000, 50)
    drawn = sample_next(logits, 1.0, 3, torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == set(logits[0].topk(3).indices.tolist())


def test_temperature_shapes_the_distribution():
    logits = torch.tensor([[0.0, 1.0]]).expand(20000, 2)
    for temperature in (0.5, 1.0, 2.0):
        drawn = sample_next(logits, temperature, None, torch.Generator().manual_seed(1)).float().mean().item()
        p_second = torch.softmax(logits[0] / temperature, dim=0)[1].item()
        assert drawn == pytest.approx(p_second, abs=0.02)


def test_sampling_depends_only_on_the_seed():
    logits = torch.randn(3, 40)
    a = sample_next(logits, 1.0, 10, torch.Generator().manual_seed(4))
    b = sample_next(logits, 1.0, 10, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)


@pytest.fixture
def run_dir(spec, tmp_path):
    """A folder holding deltanet.nl and run/, its checkpoint with random weights."""
    path = spec("deltanet", name="deltanet")
    torch.manual_seed(0)
    meta = {"spec_path": str(path), "spec_sha256": spec_sha256(path), "model_name": "deltanet", "step": 0}
    save_checkpoint(tmp_path / "run", nlc.load(str(path)), None, meta)
    return tmp_path


def nlc_generate(capsys, *argv):
    capsys.readouterr()
    code = main(["generate", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_prints_the_prompt_and_its_greedy_continuation(run_dir, capsys):
    path, run = run_dir / "deltanet.nl", run_dir / "run"
    code, out, err = nlc_generate(capsys, path, "--checkpoint", run, "--prompt", "héllo", "--tokens", 7, "--temperature", 0)
    assert (code, err) == (0, "")
    from nlc.train.checkpoint import load_model

    model, _ = load_model(run, path)
    prompt = torch.tensor([list("héllo".encode())])
    expected, _ = greedy_by_rerunning(model.eval(), prompt, 7)
    assert out == (bytes(prompt[0].tolist()) + bytes(expected[0].tolist())).decode("utf-8", errors="replace") + "\n"


def test_generate_sampling_is_seeded(run_dir, capsys):
    argv = [run_dir / "deltanet.nl", "--checkpoint", run_dir / "run", "--prompt", "a", "--tokens", 10, "--top-k", 5]
    first = nlc_generate(capsys, *argv, "--seed", 1)
    assert first[0] == 0 and nlc_generate(capsys, *argv, "--seed", 1) == first


def test_generate_refuses_bad_input_with_exit_2(run_dir, spec, capsys):
    path, run = run_dir / "deltanet.nl", run_dir / "run"
    code, out, err = nlc_generate(capsys, path, "--checkpoint", run, "--prompt", "")
    assert (code, out) == (2, "") and "--prompt is empty" in err
    code, _, err = nlc_generate(capsys, path, "--checkpoint", run_dir / "missing", "--prompt", "a")
    assert code == 2 and "does not exist" in err
    code, _, err = nlc_generate(capsys, spec("attention"), "--checkpoint", run, "--prompt", "a")
    assert code == 2 and "trained on a different spec" in err


@pytest.mark.parametrize("flags", [["--temperature", "-1"], ["--tokens", "0"], ["--top-k", "x"], []])
def test_generate_bad_flags_exit_2(run_dir, capsys, flags):
    argv = ["generate", str(run_dir / "deltanet.nl"), "--checkpoint", str(run_dir / "run"), *flags]
    if flags:
        argv += ["--prompt", "a"]
    assert main(argv) == 2
    assert "error:" in capsys.readouterr().err
