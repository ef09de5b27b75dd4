"""`python -m bench.gpu` runs end to end: every comparison at tiny sizes on CPU, the kernels in the Triton
interpreter (they serve CUDA tensors only, so their `supports` is forced here), host-clock timings. Every nlc and
PyTorch row must run and agree with the comparison's first row; fla's kernels need a GPU and may fail here."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on CPU tensors

import pytest

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be run")

import bench.gpu as gpu
from nlc.ops.cms import triton as cms_triton
from nlc.ops.network import triton as network_triton

pytestmark = [pytest.mark.triton]

if not network_triton.INTERPRETED:
    raise RuntimeError("nlc.ops.network.triton was imported before TRITON_INTERPRET=1 was set: run this file in a fresh process")


@pytest.mark.parametrize("bench", gpu.BENCHES, ids=lambda bench: bench.__name__)
def test_every_comparison_runs(bench, monkeypatch, capsys):
    monkeypatch.setattr(network_triton, "supports", lambda *args: True)
    monkeypatch.setattr(cms_triton, "supports", lambda *args: True)
    setup = gpu.Setup(batch=1, heads=2, length=64, dim=16, reps=1, peak_flops=1e9, device="cpu")
    rows = bench(setup)
    gpu.print_table(bench.__name__, rows, setup)
    assert bench.__name__ in capsys.readouterr().out

    ours = [row for row in rows if not row.name.startswith("fla ")]
    assert ours[0].name.startswith("nlc triton") and len(ours) >= 2
    for row in ours:
        assert row.seconds is not None and row.seconds > 0, f"{row.name}: {row.note}"
        assert row.rel_rmse < 2e-2, row.name  # bf16 inputs: the paths differ by rounding only
