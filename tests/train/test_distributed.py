"""`torchrun --nproc_per_node=2 -m nlc train`: two CPU processes over gloo, each with half of the global
batch, log the losses of one process with the whole batch; only rank 0 writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nlc.train import Options, train

ROOT = Path(__file__).resolve().parents[2]


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(spec, tmp_path):
    path = spec("cms")  # the piecewise task-objective loop: several backwards per step under DDP
    flags = ["--steps", "4", "--batch", "4", "--eval-every", "2"]  # rank 0 evaluates between steps, alone
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nlc", "train", str(path), *flags]
    done = subprocess.run([*command, "--out", str(tmp_path / "ddp")], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("nlc train: step 4") == 1  # rank 0 alone reports
    train(Options(spec=str(path), out=str(tmp_path / "one"), steps=4, batch=4, eval_every=2, progress=False), log=None)
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["checkpoint.json", "checkpoint.safetensors", "loss.png", "metrics.jsonl"]
