"""The Triton matrix kernels, run by the Triton interpreter on CPU, against the oracle and the chunked PyTorch paths:
outputs, final state and the gradients of every input, in float64; float32 and bfloat16 against float64."""

import os
import subprocess
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on CPU tensors

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from nlc.ops.matrix import chunk
from nlc.ops.matrix import triton as triton_path
from nlc.ops.memory import dispatch
from nlc.ops.memory.naive import gates_used
from nlc.ops.memory.naive import memory_naive as oracle
from nlc.ops.memory.rule import Gates, MemoryState, Rule
from tests.ops.helpers import relative_rmse

pytestmark = [pytest.mark.triton]

if not triton_path.INTERPRETED:
    raise RuntimeError("nlc.ops.matrix.triton was imported before TRITON_INTERPRET=1 was set: run this file in a fresh process")

RULES = {
    "delta": Rule(),
    "gated_delta": Rule(retention="decay"),
    "delta_weight_decay": Rule(retention="weight_decay"),
    "linear_attention": Rule(objective="dot"),
    "linear_attention_decay": Rule(objective="dot", retention="decay"),
    "linear_attention_weight_decay": Rule(objective="dot", retention="weight_decay"),
    "dgd_weight_decay": Rule(update="dgd", retention="weight_decay"),
    "dgd_dot_decay": Rule(objective="dot", update="dgd", retention="decay"),
    "gated_delta_stop": Rule(retention="decay", grad="stop"),
    "linear_attention_momentum": Rule(objective="dot", update="momentum"),
    "linear_attention_momentum_decay": Rule(objective="dot", update="momentum", retention="decay"),
    "l2_momentum": Rule(update="momentum"),
    "l2_momentum_decay": Rule(update="momentum", retention="decay"),
    "l2_momentum_weight_decay": Rule(update="momentum", retention="weight_decay"),
}


def pytorch_path(rule):
    """The PyTorch chunk form the kernels follow: the path the dispatcher takes for the rule on CPU."""
    gates = Gates(**{name: torch.zeros(1, 1, 1, dtype=torch.float64) for name in gates_used(rule)})
    return dispatch.find_path(rule, gates, torch.zeros(1, 1, 1, 1, dtype=torch.float64)).apply


def make_inputs(rule, length, heads=2, d_k=16, d_v=16, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def unit(*shape):  # gate values strictly inside (0, 1)
        return torch.rand(*shape, generator=gen, dtype=torch.float64) * 0.8 + 0.1

    q = rand(1, heads, length, d_k)
    k = torch.nn.functional.normalize(rand(1, heads, length, d_k), dim=-1)
    v = rand(1, heads, length, d_v)
    gates = {"lr": unit(1, heads, length) * (0.5 if rule.update == "dgd" else 1.0)}
    if rule.retention == "decay":
        gates["alpha"] = unit(1, heads, length) * 0.4 + 0.6
    if rule.retention == "weight_decay":
        gates["lam"] = unit(1, heads, length) * 0.3
    if rule.update == "momentum":
        gates["beta"] = unit(1, heads, length)
    states = [rand(1, heads, d_v, d_k) * 0.3]  # M_0, and S_0 for momentum
    if rule.update == "momentum":
        states.append(rand(1, heads, d_v, d_k) * 0.1)
    tensors = [t.to(dtype).requires_grad_() for t in (q, k, v, *gates.values(), *states)]
    return tensors, list(gates)


def run(fn, rule, tensors, gate_names, seed=1):
    """Reads, final state (and momentum) and the gradients of every input of a fixed random projection of them."""
    q, k, v, *rest = tensors
    gates = Gates(**dict(zip(gate_names, rest)))
    m0, *momentum = rest[len(gate_names) :]
    o, state = fn(q, k, v, gates, rule, MemoryState(weights=(m0,), momentum=tuple(momentum) or None))
    gen = torch.Generator().manual_seed(seed)
    loss = 0
    for t in (o, state.weights[0], *(state.momentum if momentum else ())):
        loss = loss + (t * torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype)).sum()
    grads = torch.autograd.grad(loss, tensors, materialize_grads=True)
    return o, state, grads


def kernels(chunk_size):
    return lambda *args: triton_path.apply(*args, chunk_size=chunk_size)


def assert_matches(rule, length, chunk_size=16, with_oracle=True, **kw):
    references = (oracle, pytorch_path(rule)) if with_oracle else (pytorch_path(rule),)
    tensors, gate_names = make_inputs(rule, length, **kw)
    o, state, grads = run(kernels(chunk_size), rule, tensors, gate_names)
    assert state.pos == length and o.shape == tensors[2].shape
    names = ["q", "k", "v", *gate_names, "initial state", "initial momentum"]
    for reference in references:
        o_ref, state_ref, grads_ref = run(reference, rule, tensors, gate_names)
        torch.testing.assert_close(o, o_ref, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(state.weights[0], state_ref.weights[0], rtol=1e-9, atol=1e-9)
        if rule.update == "momentum":
            torch.testing.assert_close(state.momentum[0], state_ref.momentum[0], rtol=1e-9, atol=1e-9)
        for name, got, want in zip(names, grads, grads_ref):
            torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9, msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.parametrize("name", list(RULES))
def test_matches_oracle_and_chunk_path(name, poison_empty):
    assert_matches(RULES[name], 37)


@pytest.mark.parametrize("name", ["gated_delta", "linear_attention_momentum", "l2_momentum_weight_decay"])
@pytest.mark.parametrize(("length", "chunk_size"), [(5, 16), (40, 32), (33, 16)])
def test_chunk_sizes_and_lengths(name, length, chunk_size):
    assert_matches(RULES[name], length, chunk_size, with_oracle=False)


@pytest.mark.parametrize("name", ["delta", "linear_attention_decay"])
def test_widths_not_powers_of_two(name):
    """d_k = 12, d_v = 20: the tiles are padded to 16 and 32 columns and masked."""
    assert_matches(RULES[name], 21, d_k=12, d_v=20, with_oracle=False)


@pytest.mark.parametrize("name", ["gated_delta", "dgd_weight_decay", "linear_attention_momentum_decay", "l2_momentum_decay"])
def test_state_columns_split_across_programs(name, monkeypatch):
    """d_v = 20 in blocks of 16 columns: two programs per head, the last one masked; gradients summed over them."""
    monkeypatch.setattr(triton_path, "BLOCK_V", 16)
    assert_matches(RULES[name], 21, d_v=20, with_oracle=False)


@pytest.mark.parametrize("name", ["gated_delta", "dgd_weight_decay", "linear_attention_momentum_decay", "l2_momentum_weight_decay"])
def test_streaming_equals_one_call(name):
    rule = RULES[name]
    tensors, gate_names = make_inputs(rule, 40)
    q, k, v, *rest = (t.detach() for t in tensors)
    gates = dict(zip(gate_names, rest))
    m0, *momentum = rest[len(gate_names) :]
    start = MemoryState(weights=(m0,), momentum=tuple(momentum) or None)
    apply = kernels(16)
    whole, whole_state = apply(q, k, v, Gates(**gates), rule, start)
    state, pieces = start, []
    for lo, hi in [(0, 3), (3, 20), (20, 40)]:
        part = Gates(**{n: g[:, :, lo:hi] for n, g in gates.items()})
        o, state = apply(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], part, rule, state)
        pieces.append(o)
    torch.testing.assert_close(torch.cat(pieces, dim=2), whole, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state.weights[0], whole_state.weights[0], rtol=1e-10, atol=1e-10)
    if momentum:
        torch.testing.assert_close(state.momentum[0], whole_state.momentum[0], rtol=1e-10, atol=1e-10)
    assert state.pos == whole_state.pos == 40


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("name", ["gated_delta", "linear_attention_momentum_decay", "l2_momentum_decay"])
def test_low_precision_close_to_float64(name, dtype, tolerance):
    """fla-style comparison: relative RMSE of reads, final state and every gradient against the float64 kernels
    on the same (rounded) input values."""
    rule = RULES[name]
    tensors_low, gate_names = make_inputs(rule, 40, dtype=dtype)
    tensors64 = [t.detach().double().requires_grad_() for t in tensors_low]
    o, state, grads = run(kernels(16), rule, tensors_low, gate_names)
    o64, state64, grads64 = run(kernels(16), rule, tensors64, gate_names)
    assert o.dtype == state.weights[0].dtype == dtype
    finals, finals64 = (s.weights + (s.momentum or ()) for s in (state, state64))
    for got, want in zip((o, *finals, *grads), (o64, *finals64, *grads64)):
        assert got.dtype == dtype
        assert relative_rmse(got, want) < tolerance


def test_empty_sequence_keeps_the_state():
    rule = RULES["gated_delta"]
    tensors, _ = make_inputs(rule, 0)
    q, k, v, lr, alpha, m0 = tensors
    o, state = triton_path.apply(q, k, v, Gates(lr=lr, alpha=alpha), rule, MemoryState(weights=(m0,), pos=3))
    assert o.shape == (1, 2, 0, 16) and state.pos == 3
    torch.testing.assert_close(state.weights[0], m0, rtol=0, atol=0)


def test_no_state_means_zeros():
    rule = RULES["gated_delta"]
    tensors, _ = make_inputs(rule, 20)
    q, k, v, lr, alpha, _ = (t.detach() for t in tensors)
    gates = Gates(lr=lr, alpha=alpha)
    o, state = triton_path.apply(q, k, v, gates, rule, None, chunk_size=16)
    o_ref, state_ref = oracle(q, k, v, gates, rule, None)
    torch.testing.assert_close(o, o_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(state.weights[0], state_ref.weights[0], rtol=1e-9, atol=1e-9)
    assert state.pos == state_ref.pos == 20


def test_final_state_gradient_alone():
    """A loss on the final state only: the reads' gradient reaches the kernel as None."""
    rule = RULES["gated_delta"]
    tensors, _ = make_inputs(rule, 20)
    q, k, v, lr, alpha, m0 = tensors
    grads = []
    for fn in (kernels(16), oracle):
        _, state = fn(q, k, v, Gates(lr=lr, alpha=alpha), rule, MemoryState(weights=(m0,)))
        grads.append(torch.autograd.grad(state.weights[0].sum(), tensors, allow_unused=True, materialize_grads=True))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9)


def test_custom_op_registration():
    """Schema, fake (meta) implementation and autograd registration of the forward ops agree with the kernels."""
    checks = ("test_schema", "test_faketensor", "test_autograd_registration")
    tensors, _ = make_inputs(RULES["gated_delta"], 16)
    q, k, v, lr, alpha, m0 = (t.detach() for t in tensors)
    g = alpha.log().cumsum(-1)
    torch.library.opcheck(triton_path.chunk_forward, (q, k, v, lr, lr, g, None, m0.transpose(-1, -2).contiguous(), 16, False), test_utils=checks)
    s0 = torch.stack((m0, m0), dim=2).transpose(-1, -2).contiguous()  # [B, H, 2, d_k, d_v]
    torch.library.opcheck(triton_path.momentum_forward, (q, k, v, lr, g, g, None, s0, 16, 12, False), test_utils=checks)
    torch.library.opcheck(triton_path.momentum_forward, (q, k, v, lr, g, g, g - 0.1, s0, 16, 12, False), test_utils=checks)


@pytest.mark.parametrize("name", ["delta", "l2_momentum_decay"])
def test_compiles_without_graph_breaks(name):
    rule = RULES[name]
    tensors, gate_names = make_inputs(rule, 20)
    inputs = [t.detach() for t in tensors]

    def reads(q, k, v, *rest):
        m0, *momentum = rest[len(gate_names) :]
        state = MemoryState(weights=(m0,), momentum=tuple(momentum) or None)
        return triton_path.apply(q, k, v, Gates(**dict(zip(gate_names, rest))), rule, state, chunk_size=16)[0]

    compiled = torch.compile(reads, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*inputs), reads(*inputs), rtol=1e-12, atol=1e-12)


def cuda_like(*shape, dtype=torch.float32):
    """A tensor that reports itself on CUDA, without a GPU (shape and device only, no data)."""
    with FakeTensorMode():
        return torch.empty(*shape, device="cuda", dtype=dtype)


def test_chosen_for_cuda_tensors_before_the_chunk_path(monkeypatch):
    # on a machine with a GPU the kernels are loaded; here, pretend there is one
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dispatch, "_loaded", None)
    rule, gates = RULES["gated_delta"], Gates(lr=cuda_like(1, 2, 8), alpha=cuda_like(1, 2, 8))
    assert triton_path.supports(rule, gates, cuda_like(1, 2, 8, 16))
    assert dispatch.find_path(rule, gates, cuda_like(1, 2, 8, 16)) is triton_path
    assert dispatch.find_path(rule, gates, cuda_like(1, 2, 8, 16, dtype=torch.bfloat16)) is triton_path
    paths = list(dispatch.FAST_PATHS)
    assert paths.index("nlc.ops.matrix.triton") < paths.index("nlc.ops.matrix.chunk")


@pytest.mark.parametrize("name", ["l2_momentum", "l2_momentum_decay", "l2_momentum_weight_decay"])
def test_l2_momentum_chosen_for_cuda_tensors(name, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dispatch, "_loaded", None)
    head = cuda_like(1, 2, 8)
    gates = Gates(lr=head, beta=head, alpha=head, lam=head)
    for dtype in (torch.float32, torch.bfloat16):
        assert dispatch.find_path(RULES[name], gates, cuda_like(1, 2, 8, 16, dtype=dtype)) is triton_path
    assert not triton_path.supports(RULES[name], gates, cuda_like(1, 2, 8, 16, dtype=torch.float64))


def test_never_chosen_on_cpu_nor_for_float64():
    rule, gates = RULES["gated_delta"], Gates(lr=torch.zeros(1, 2, 8), alpha=torch.zeros(1, 2, 8))
    assert not triton_path.supports(rule, gates, torch.zeros(1, 2, 8, 16))  # even with TRITON_INTERPRET=1
    assert dispatch.find_path(rule, gates, torch.zeros(1, 2, 8, 16)) is chunk
    assert not triton_path.supports(rule, gates, cuda_like(1, 2, 8, 16, dtype=torch.float64))


@pytest.mark.parametrize(
    "rule",
    [
        Rule(objective="dot", update="momentum", grad="stop"),
        Rule(objective="huber"),
        Rule(every=2),
        Rule(window=2),
        Rule(update="momentum", window=2),
        Rule(objective="huber", update="momentum"),
        Rule(update="momentum", grad="stop"),
        Rule(update="momentum", targets="self"),
        Rule(update="momentum", batch=2),
        Rule(update="momentum", every=2),
        Rule(update="muon"),
    ],
)
def test_declines_what_the_chunk_form_does_not_compute(rule):
    head = cuda_like(1, 1, 4)
    gates = Gates(lr=head, beta=head, delta=head)
    assert not triton_path.supports(rule, gates, cuda_like(1, 1, 4, 16))


def test_declines_keys_wider_than_a_program_holds():
    gates = Gates(lr=cuda_like(1, 1, 4))
    assert triton_path.supports(Rule(), gates, cuda_like(1, 1, 4, triton_path.MAX_KEY_WIDTH))
    assert not triton_path.supports(Rule(), gates, cuda_like(1, 1, 4, 2 * triton_path.MAX_KEY_WIDTH))


def test_rejects_chunk_sizes_the_tiles_cannot_take():
    tensors, _ = make_inputs(RULES["delta"], 8)
    q, k, v, lr, m0 = tensors
    for size in (8, 24):
        with pytest.raises(ValueError, match="power of two"):
            triton_path.apply(q, k, v, Gates(lr=lr), RULES["delta"], MemoryState(weights=(m0,)), chunk_size=size)


# Compiles the kernels for an H100 (sm_90) without a GPU, in a process where TRITON_INTERPRET is unset.
COMPILE_FOR_SM90 = """
import sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from nlc.ops.matrix import triton as kernels
d = int(sys.argv[1])
block_k, block_v, _ = kernels._blocks(d, d)
constants = dict(DK=d, DV=d, C=kernels.CHUNK, BK=block_k, BV=block_v, HAS_ERASE=True, HAS_DECAY=True, HAS_ERASE_POINT=True, PRECISION="tf32")
options = {"num_warps": kernels.NUM_WARPS, "num_stages": kernels.NUM_STAGES}
# the backward kernels hold the forwards' terms and more; momentum with and without l2
for kernel, l2 in ((kernels._backward_kernel, False), (kernels._momentum_backward_kernel, False), (kernels._momentum_backward_kernel, True)):
    signature = {name: "*fp32" if name.endswith("_ptr") else "i32" if name in ("T", "LENGTH") else "constexpr" for name in kernel.arg_names}
    flags = {**constants, "L2": l2}
    source = ASTSource(kernel, signature, constexprs={name: flags[name] for name in kernel.arg_names if name in flags})
    print(triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).metadata.shared)
"""
H100_SHARED_PER_BLOCK = 227 * 1024


@pytest.mark.parametrize("width", [128])  # the widest tiles: the most shared memory
def test_kernels_compile_for_h100_within_its_shared_memory(width):
    """The interpreter runs any Python; this compiles the real backward kernels (default launch shape, every
    feature on), which hold the most tiles, for sm_90 and checks that a block fits in an H100's shared memory."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90, str(width)], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    shared = [int(line) for line in done.stdout.split()]
    assert len(shared) == 3 and all(0 < size <= H100_SHARED_PER_BLOCK for size in shared), shared


def test_declines_per_channel_gates():
    """chunk.py computes some per-channel gates (GLA-style linear attention); the kernels take one per head."""
    head, channel, q = cuda_like(1, 1, 4), cuda_like(1, 1, 4, 16), cuda_like(1, 1, 4, 16)
    assert triton_path.supports(Rule(objective="dot", retention="decay"), Gates(lr=head, alpha=head), q)
    assert not triton_path.supports(Rule(objective="dot", retention="decay"), Gates(lr=head, alpha=channel), q)
    assert not triton_path.supports(Rule(objective="dot"), Gates(lr=channel), q)
    assert not triton_path.supports(Rule(retention="decay"), Gates(lr=head, alpha=channel), q)
    for name in ("lr", "beta", "lam"):
        gates = {"lr": head, "beta": head, "lam": head, name: channel}
        assert triton_path.supports(Rule(update="momentum", retention="weight_decay"), Gates(**{**gates, name: head}), q)
        assert not triton_path.supports(Rule(update="momentum", retention="weight_decay"), Gates(**gates), q)
