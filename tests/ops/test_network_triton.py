"""The Triton MLP-memory kernels (forward and backward), run by the Triton interpreter on CPU, against the oracle and
the chunked PyTorch path: reads, every state field and the gradients of every input, in float64; float32 and bfloat16
against float64."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on CPU tensors

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from nlc.ops.memory import dispatch
from nlc.ops.memory.naive import memory_naive as oracle
from nlc.ops.memory.naive import named_tensors
from nlc.ops.memory.rule import Gates, Rule, Structure
from nlc.ops.network import chunk
from nlc.ops.network import triton as triton_path
from tests.ops.helpers import OnCuda, assert_close_with_grads, random_inputs, relative_rmse, run_in_pieces

pytestmark = [pytest.mark.triton]

if not triton_path.INTERPRETED:
    raise RuntimeError("nlc.ops.network.triton was imported before TRITON_INTERPRET=1 was set: run this file in a fresh process")

TITANS = Structure("mlp", depth=2, expand=2, act="gelu")
TTT_MLP = Structure("mlp", depth=2, expand=2, act="gelu", residual=True, norm="layer")
# swiglu: W1 stacks W_gate and W_up ([2 * hidden, d_k]); hidden = 12 pads the tile rows
SWIGLU = Structure("mlp", depth=2, expand=1.5, act="swiglu")
SWIGLU_LAYER = Structure("mlp", depth=2, expand=1.5, act="swiglu", residual=True, norm="layer")
RULES = {
    "titans": Rule(structure=TITANS, update="momentum", retention="weight_decay", batch=8),
    "ttt_mlp": Rule(structure=TTT_MLP, batch=8),
    "silu_rms_decay_momentum": Rule(structure=Structure("mlp", depth=2, expand=1.5, act="silu", norm="rms"), update="momentum", retention="decay", batch=8),
    "relu_residual_weight_decay": Rule(structure=Structure("mlp", depth=2, expand=1, act="relu", residual=True), retention="weight_decay", batch=8),
    "every_gd": Rule(structure=TITANS, every=8),
    "every_momentum_decay_layer": Rule(structure=TTT_MLP, update="momentum", retention="decay", every=8, batch=4),
    "titans_stop": Rule(structure=TITANS, update="momentum", retention="weight_decay", batch=8, grad="stop"),
    "every_stop": Rule(structure=TTT_MLP, update="momentum", retention="weight_decay", every=8, grad="stop"),
    "swiglu_momentum_weight_decay": Rule(structure=SWIGLU, update="momentum", retention="weight_decay", batch=8),
    "swiglu_rms_decay": Rule(structure=Structure("mlp", depth=2, expand=2, act="swiglu", norm="rms"), retention="decay", batch=8),
    "swiglu_every_momentum_decay_layer": Rule(structure=SWIGLU_LAYER, update="momentum", retention="decay", every=8, batch=4),
    "swiglu_every_gd": Rule(structure=SWIGLU, every=8),
    "swiglu_stop": Rule(structure=SWIGLU_LAYER, update="momentum", retention="decay", batch=8, grad="stop"),
    "swiglu_every_stop": Rule(structure=SWIGLU, update="momentum", retention="weight_decay", every=8, grad="stop"),
}


def inputs_for(rule, length, heads=1, d=8, dtype=torch.float64, seed=0, d_v=None):
    inputs = random_inputs(rule, B=1, H=heads, T=length, dk=d, dv=d_v or d, dtype=dtype, seed=seed)
    # a mini-batch or chunk sums up to 8 gradients: smaller steps keep the states O(1)
    with torch.no_grad():
        inputs["gates"].lr.mul_(0.25)
    return inputs


@pytest.mark.parametrize("name", list(RULES))
def test_matches_oracle_and_chunk_path(name, poison_empty):
    """21 tokens: two whole groups of 8 and a partial one (a returned anchor, or a pending sum)."""
    inputs = inputs_for(RULES[name], 21)
    assert_close_with_grads(oracle, triton_path.apply, inputs)
    assert_close_with_grads(chunk.apply, triton_path.apply, inputs, atol=1e-11, rtol=1e-10)


@pytest.mark.parametrize(("length", "group"), [(5, 8), (16, 8), (19, 4), (24, 16)])
@pytest.mark.parametrize("field", ["batch", "every"])
@pytest.mark.parametrize("structure", [TITANS, SWIGLU], ids=["gelu", "swiglu"])
def test_group_sizes_and_lengths(structure, field, length, group):
    """Groups smaller than the kernel's 16-row tile (rows masked), exactly 16, and calls shorter than a group."""
    rule = Rule(structure=structure, update="momentum", retention="decay", **{field: group})
    assert_close_with_grads(chunk.apply, triton_path.apply, inputs_for(rule, length), atol=1e-11, rtol=1e-10)


@pytest.mark.parametrize("act", ["silu", "swiglu"])
def test_widths_not_powers_of_two(act):
    """d_k = 12, d_v = 10, hidden = 18: every tile padded and masked, the norm over the 10 real columns (swiglu: the
    up half of W1 starts at row 18)."""
    rule = Rule(structure=Structure("mlp", depth=2, expand=1.5, act=act, norm="layer"), update="momentum", batch=8)
    assert_close_with_grads(chunk.apply, triton_path.apply, inputs_for(rule, 13, d=12, d_v=10), atol=1e-11, rtol=1e-10)


@pytest.mark.parametrize("name", ["titans", "every_momentum_decay_layer", "titans_stop", "swiglu_momentum_weight_decay", "swiglu_every_momentum_decay_layer"])
def test_streaming_equals_one_call(name):
    """Calls that start and end inside groups (the ends go through the chunk path) give the oracle's one call."""
    inputs = inputs_for(RULES[name], 23)

    def pieces(**kw):
        return run_in_pieces(triton_path.apply, kw, cuts=[3, 5, 21])

    assert_close_with_grads(oracle, pieces, inputs)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("name", ["titans", "every_momentum_decay_layer", "swiglu_momentum_weight_decay"])
def test_low_precision_close_to_float64(name, dtype, tolerance):
    """fla-style: relative RMSE of the reads, every state tensor and every gradient against the float64 kernel
    on the same (rounded) input values."""
    rule = RULES[name]
    low = inputs_for(rule, 21, dtype=dtype)
    leaves_low = [t for _, t in named_tensors(low) if t.requires_grad]
    high = inputs_for(rule, 21)
    with torch.no_grad():
        for (_, t64), t in zip(named_tensors(high), leaves_low, strict=True):
            t64.copy_(t.double())
    leaves_high = [t for _, t in named_tensors(high) if t.requires_grad]
    results = []
    for inputs, leaves in ((low, leaves_low), (high, leaves_high)):
        o, state = triton_path.apply(**inputs)
        outs = [o, *(t for _, t in named_tensors(state))]
        gen = torch.Generator().manual_seed(1)
        loss = sum((t * torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype)).sum() for t in outs)
        results.append((outs, torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)))
    (outs, grads), (outs64, grads64) = results
    assert outs[0].dtype == dtype
    for got, want in zip((*outs, *grads), (*outs64, *grads64), strict=True):
        assert got.dtype == dtype
        assert relative_rmse(got, want) < tolerance


@pytest.mark.parametrize(
    "name", ["ttt_mlp", "silu_rms_decay_momentum", "every_momentum_decay_layer", "every_stop", "swiglu_stop", "swiglu_every_momentum_decay_layer"]
)
def test_two_batch_rows_two_heads(name):
    """B = 2, H = 2: one program per (batch, head), each head its own norm parameters, their gradients summed over
    the batch rows."""
    rule = RULES[name]
    inputs = random_inputs(rule, B=2, H=2, T=13, dk=8, dv=8, seed=3)
    with torch.no_grad():
        inputs["gates"].lr.mul_(0.25)
    assert_close_with_grads(oracle, triton_path.apply, inputs)


@pytest.mark.parametrize("field", ["batch", "every"])
@pytest.mark.parametrize("structure", [TITANS, SWIGLU], ids=["gelu", "swiglu"])
def test_gates_at_zero(structure, field):
    """Retention and momentum gates of exactly 0 inside a group: the log-space scans floor them at 1e-30, and the
    gates' gradients still match the oracle's (no difference of large sums divided by the gate)."""
    rule = Rule(structure=structure, update="momentum", retention="decay", **{field: 8})
    inputs = inputs_for(rule, 16)
    with torch.no_grad():
        inputs["gates"].alpha[:, :, [3, 7]] = 0.0
        inputs["gates"].beta[:, :, 5] = 0.0
    assert_close_with_grads(oracle, triton_path.apply, inputs)


def test_final_state_gradient_alone():
    """A loss on the end weights only: the reads' gradient reaches the op as None."""
    inputs = inputs_for(RULES["titans"], 16)
    leaves = [t for _, t in named_tensors(inputs) if t.requires_grad]
    grads = []
    for fn in (triton_path.apply, oracle):
        _, state = fn(**inputs)
        loss = state.weights[0].sum() + state.weights[1].square().sum()
        grads.append(torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9)


def forward_args(length=16, every=False):
    inputs = inputs_for(RULES["titans"], length)
    gates, (w1, w2), (s1, s2) = inputs["gates"], inputs["state"].weights, inputs["state"].momentum
    tensors = (inputs["q"], inputs["k"], inputs["v"], gates.lr, 1 - gates.lam, gates.beta, w1, w2, s1, s2, None, None)
    return (*(t if t is None else t.detach() for t in tensors), 8, every, "gelu", "none", False, False, False, not every)


def test_custom_op_registration():
    """Schemas and fake (meta) implementations of the three ops, and the forward's autograd registration."""
    tests = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(triton_path.mlp_forward, forward_args(), test_utils=tests)
    torch.library.opcheck(triton_path.mlp_forward, forward_args(every=True), test_utils=tests)
    q, k, v, lr, keep, beta, *_ = args = forward_args()
    o, w1_end, w2_end, s1_end, s2_end, p1, p2, *starts = triton_path.mlp_forward(*args)
    grads = [torch.randn_like(t) for t in (o, w1_end, w2_end, s1_end, s2_end, p1, p2)]
    backward_args = (q, k, v, lr, keep, beta, *starts, None, None, *grads, 8, False, "gelu", "none", False, False)
    torch.library.opcheck(triton_path.mlp_backward, backward_args, test_utils=("test_schema", "test_faketensor"))
    read_args = (q, k, v, lr, keep, beta, *starts, None, None, *grads[:3], 8, False, "gelu", "none", False, False)
    torch.library.opcheck(triton_path.mlp_read_backward, read_args, test_utils=("test_schema", "test_faketensor"))


def test_compiles_without_graph_breaks():
    """torch.compile traces the op as one node, forward and backward; the results are the eager ones."""
    rule = RULES["titans"]
    inputs = inputs_for(rule, 16)
    q, k, v = (inputs[n].detach().requires_grad_() for n in "qkv")
    gates, state = inputs["gates"], inputs["state"]

    def reads(q, k, v):
        return triton_path.apply(q, k, v, gates, rule, state)[0]

    compiled = torch.compile(reads, backend="aot_eager", fullgraph=True)
    eager = reads(q, k, v)
    traced = compiled(q, k, v)
    torch.testing.assert_close(traced, eager, rtol=1e-12, atol=1e-12)
    probe = torch.randn_like(eager)
    grads = torch.autograd.grad((eager * probe).sum(), (q, k, v))
    traced_grads = torch.autograd.grad((traced * probe).sum(), (q, k, v))
    for got, want in zip(traced_grads, grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_never_chosen_on_cpu_and_registered_before_chunk():
    inputs = inputs_for(RULES["titans"], 4)
    q, gates = inputs["q"], inputs["gates"]
    assert not triton_path.supports(RULES["titans"], gates, q)  # CPU, even with TRITON_INTERPRET=1
    assert dispatch.find_path(RULES["titans"], gates, q) is chunk
    paths = list(dispatch.FAST_PATHS)
    assert paths.index("nlc.ops.network.triton") < paths.index("nlc.ops.network.chunk")


def test_supports_the_hot_loop_only():
    q = torch.zeros(1, 1, 4, 64).as_subclass(OnCuda)
    gates = Gates(lr=torch.zeros(1, 1, 4), beta=torch.zeros(1, 1, 4), alpha=torch.zeros(1, 1, 4), lam=torch.zeros(1, 1, 4))
    yes = [RULES[name] for name in RULES] + [
        Rule(structure=Structure("mlp", depth=2, expand=4), batch=64),
        Rule(structure=Structure("mlp", depth=2, expand=2, act="swiglu"), every=16),  # W_gate and W_up: 2 x 128 x 64
    ]
    no = [
        Rule(structure=TITANS),  # one token at a time
        Rule(structure=Structure("mlp", depth=3, expand=2), batch=8),
        Rule(structure=Structure("mlp", depth=2, expand=4, act="swiglu"), every=16),  # W_gate and W_up beyond the tile
        Rule(structure=Structure("linear"), batch=8),
        Rule(structure=TITANS, objective="dot", batch=8),
        Rule(structure=TITANS, update="muon", batch=8),
        Rule(structure=TITANS, window=2, batch=8),
        Rule(structure=Structure("mlp", depth=2, expand=16), batch=8),  # W1 beyond the register tile
    ]
    for rule in yes:
        assert triton_path.supports(rule, gates, q), rule
        assert triton_path.supports(rule, gates, q.to(torch.bfloat16)), rule
    for rule in no:
        assert not triton_path.supports(rule, gates, q), rule
    assert not triton_path.supports(RULES["titans"], gates, q.double())
    per_channel = Gates(lr=torch.zeros(1, 1, 4, 64), beta=gates.beta, lam=gates.lam)
    assert not triton_path.supports(RULES["titans"], per_channel, q)
