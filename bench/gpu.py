"""GPU throughput of the Triton memory kernels (forward + backward), against baselines timed in the same run.

    python -m bench.gpu [--B 8] [--H 16] [--T 4096] [--d 64 128] [--reps 10]

Each `bench_*` function measures one comparison and returns its rows; BENCHES lists them and `main` prints one
table per width. Columns:
  tokens/s      B * T per second of forward + backward (median over --reps, CUDA events)
  TFLOP/s       the matmul FLOPs that FlopCounterMode counts in the chunked PyTorch path for the same rule and
                shape, divided by the row's time: the same work for every row of a comparison (triangular solves
                are not counted, so it is a lower bound)
  % peak        that figure over the bf16 matmul throughput measured at the start of the run
  vs first      the row's speed over the comparison's first row (the nlc Triton kernel)
  rRMSE         relative RMSE of the row's reads against the first row's (they compute the same recurrence)
Inputs are bf16, keys l2-normalised, the initial state zero. matrix_l2_momentum (Titans' loss with a matrix memory)
compares with `scaled_chunk.py`, which takes float32 only: both rows get the bf16 inputs cast to float32 and tf32
matmul operands (the Triton kernels compute bf16 inputs that way too).

cms_task_write_*: one `learn` of a CMS level with objective = task (width H * d, an mlp with hidden 4 H d,
float32 state): one piece's gradient folded into the pending chunk, then the chunk written with gd or momentum.
tokens/s is B * T over that call alone (no forward or backward), no FLOPs are counted, and each row's name
gives its effective bandwidth: the bytes the fused kernel must move (gd: read delta, pending, gradient, write
delta; momentum: also read and write S) over the row's time. rRMSE compares the new delta.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.flops import matmul_flop_counter
from nlc.ops.memory.rule import Gates, MemoryState, Rule


@dataclass
class Setup:
    batch: int
    heads: int
    length: int
    dim: int
    reps: int
    peak_flops: float  # bf16 matmul FLOP/s measured in this run
    device: str = "cuda"


@dataclass
class Row:
    name: str
    seconds: float | None  # None: not run, see note
    flops: float | None = None
    rel_rmse: float | None = None
    note: str = ""


def seconds_of(run: Callable[[], object]) -> float:
    """Wall time of one call: CUDA events around it on a GPU, the host clock elsewhere (the CPU smoke test)."""
    if not torch.cuda.is_available():
        start = time.perf_counter()
        run()
        return time.perf_counter() - start
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3


def time_fwd_bwd(step: Callable[[], torch.Tensor], leaves: list[torch.Tensor], reps: int) -> float:
    """Median seconds of forward + backward, after two warm-up runs (Triton compiles on the first)."""

    def run():
        for t in leaves:
            t.grad = None
        out = step()
        out.backward(torch.ones_like(out))

    return statistics.median([seconds_of(run) for _ in range(reps + 2)][2:])


def counted_flops(step: Callable[[], torch.Tensor]) -> float:
    with matmul_flop_counter() as counter:
        out = step()
        out.backward(torch.ones_like(out))
    return counter.get_total_flops()


def matmul_peak(size: int = 8192, reps: int = 10) -> float:
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    return 2 * size**3 / statistics.median([seconds_of(lambda: a @ b) for _ in range(reps + 2)][2:])


def relative_rmse(actual: torch.Tensor, expected: torch.Tensor) -> float:
    diff = (actual.float() - expected.float()).square().mean().sqrt()
    return (diff / expected.float().square().mean().sqrt().clamp_min(1e-12)).item()


@dataclass
class Candidate:
    name: str
    step: Callable[[], object] | None  # None: not run, see `why`
    why: str = ""
    leaves: list[torch.Tensor] | None = None  # forward + backward timed, these leaves' grads reset; None: forward only


def measure(candidates: list[Candidate], reps: int, flops: float | None = None, reads=lambda out: out, bytes_moved: int | None = None) -> list[Row]:
    """Each candidate's reads, compared with those of the first that ran, and its time. A candidate that fails is
    reported in its row, not raised (fla's kernels need a GPU; torch.compile may lack a backend for the device).
    With `bytes_moved` the row's name gives the effective bandwidth."""
    rows, reference = [], None
    for c in candidates:
        if c.step is None:
            rows.append(Row(c.name, None, note=c.why))
            continue
        try:
            with torch.no_grad():
                out = reads(c.step())
            seconds = time_forward(c.step, reps) if c.leaves is None else time_fwd_bwd(c.step, c.leaves, reps)
        except Exception as err:
            rows.append(Row(c.name, None, note=f"failed ({type(err).__name__}: {err})"))
            continue
        reference = out if reference is None else reference
        name = c.name if bytes_moved is None else f"{c.name}, {bytes_moved / seconds / 1e12:.2f} TB/s"
        rows.append(Row(name, seconds, flops, relative_rmse(out, reference)))
    return rows


def matrix_inputs(setup: Setup, seed: int = 0) -> dict[str, torch.Tensor]:
    """Leaves in nlc's layout: q, k, v [B, H, T, d] bf16, lr, alpha and beta [B, H, T] bf16, m0 [B, H, d, d] zeros."""
    gen = torch.Generator(device=setup.device).manual_seed(seed)
    shape = (setup.batch, setup.heads, setup.length, setup.dim)

    def randn(*size):
        return torch.randn(*size, generator=gen, device=setup.device)

    tensors = {
        "q": randn(*shape) / setup.dim**0.5,
        "k": F.normalize(randn(*shape), dim=-1),
        "v": randn(*shape),
        "lr": randn(*shape[:3]).sigmoid(),
        "alpha": (randn(*shape[:3]) + 4).sigmoid(),  # retention mostly in (0.95, 1)
        "beta": (randn(*shape[:3]) + 2).sigmoid(),  # momentum decay
    }
    tensors = {name: t.bfloat16().requires_grad_() for name, t in tensors.items()}
    tensors["m0"] = torch.zeros(setup.batch, setup.heads, setup.dim, setup.dim, device=setup.device, dtype=torch.bfloat16)
    return tensors


def nlc_step(apply, rule: Rule, x: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> Callable[[], torch.Tensor]:
    """One call on the leaves, cast to `dtype` inside the step (so the cast's backward is timed too) when given."""

    def step():
        t = x if dtype is None else {name: leaf.to(dtype) for name, leaf in x.items()}
        gates = Gates(lr=t["lr"], alpha=t["alpha"] if rule.retention == "decay" else None, beta=t["beta"] if rule.update == "momentum" else None)
        return apply(t["q"], t["k"], t["v"], gates, rule, MemoryState(weights=(t["m0"],)))[0]

    return step


def fla_step(function_name: str, x: dict[str, torch.Tensor]) -> tuple[Callable[[], torch.Tensor] | None, str]:
    """fla's kernel on the same values in its [B, T, H, d] layout; it returns reads back in nlc's layout."""
    try:
        if function_name == "chunk_delta_rule":
            from fla.ops.delta_rule import chunk_delta_rule as function
        else:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule as function
    except ImportError as err:
        return None, f"fla not importable ({err})"
    native = {name: x[name].detach().transpose(1, 2).contiguous().requires_grad_() for name in ("q", "k", "v", "lr", "alpha")}

    def step():
        q, k, v, beta = native["q"], native["k"], native["v"], native["lr"]
        if function_name == "chunk_delta_rule":
            o, _ = function(q, k, v, beta, scale=1.0)
        else:
            o, _ = function(q, k, v, native["alpha"].float().log(), beta, scale=1.0)
        return o.transpose(1, 2)

    step.leaves = list(native.values())
    return step, ""


def compare(setup: Setup, rule: Rule, fla_function: str | None) -> list[Row]:
    """nlc's Triton kernel, the chunked PyTorch path the dispatcher takes off CUDA and (where it covers the rule)
    fla, on the same inputs. A path that does not take bf16 gets both nlc rows float32 inputs and tf32 products."""
    from nlc.ops.memory.dispatch import find_path
    from nlc.ops.memory.naive import gates_used

    def cpu_path(dtype):
        gates = Gates(**{name: torch.zeros(1, 1, 1, dtype=dtype) for name in gates_used(rule)})
        return find_path(rule, gates, torch.zeros(1, 1, 1, 1, dtype=dtype))

    path = cpu_path(torch.float32)
    pytorch = (f"nlc {path.NAME.removeprefix('matrix.')} (PyTorch)", path.apply)
    if cpu_path(torch.bfloat16) is path:
        return _compare(setup, rule, fla_function, pytorch, None)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return _compare(setup, rule, fla_function, pytorch, torch.float32)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def _compare(setup: Setup, rule: Rule, fla_function: str | None, pytorch: tuple[str, Callable], dtype: torch.dtype | None) -> list[Row]:
    x = matrix_inputs(setup)
    leaves = [t for t in x.values() if t.requires_grad]
    pytorch_name, pytorch_apply = pytorch
    flops = counted_flops(nlc_step(pytorch_apply, rule, x, dtype))
    candidates = []
    try:
        from nlc.ops.matrix import triton as triton_path

        candidates.append(Candidate("nlc triton", nlc_step(triton_path.apply, rule, x, dtype), leaves=leaves))
    except ImportError as err:
        candidates.append(Candidate("nlc triton", None, f"not importable ({err})"))
    candidates.append(Candidate(pytorch_name, nlc_step(pytorch_apply, rule, x, dtype), leaves=leaves))
    if fla_function is not None:
        step, why = fla_step(fla_function, x)
        candidates.append(Candidate(f"fla {fla_function}", step, why, getattr(step, "leaves", [])))
    return measure(candidates, setup.reps, flops)


def bench_matrix_delta(setup: Setup) -> list[Row]:
    return compare(setup, Rule(), "chunk_delta_rule")


def bench_matrix_gated_delta(setup: Setup) -> list[Row]:
    return compare(setup, Rule(retention="decay"), "chunk_gated_delta_rule")


def bench_matrix_linear_attention_decay(setup: Setup) -> list[Row]:
    return compare(setup, Rule(objective="dot", retention="decay"), None)


def bench_matrix_linear_attention_momentum(setup: Setup) -> list[Row]:
    return compare(setup, Rule(objective="dot", update="momentum", retention="decay"), None)


def bench_matrix_l2_momentum(setup: Setup) -> list[Row]:
    return compare(setup, Rule(update="momentum", retention="decay"), None)


def network_rule(setup: Setup, **fields) -> Rule:
    """A Titans-style memory: mlp depth 2 (gelu), l2, momentum, weight decay, mini-batches of 64. The hidden
    width is 2d up to d = 64 and d beyond (hidden x d must fit the Triton kernel's register tile)."""
    from nlc.ops.memory.rule import Structure

    structure = Structure("mlp", depth=2, expand=2.0 if setup.dim <= 64 else 1.0, act="gelu")
    return Rule(**{"structure": structure, "update": "momentum", "retention": "weight_decay", "batch": 64, **fields})


def network_inputs(setup: Setup, rule: Rule, seed: int = 0) -> dict[str, torch.Tensor]:
    """Leaves: q, k, v [B, H, T, d] bf16, lr / beta / lam [B, H, T] bf16, the initial weights [B, H, out, in] float32
    (a learned initial state); sigmoid gates with lr and lam scaled by 1e-2, as a layer would give them."""
    from nlc.ops.memory.structure import weight_shapes

    gen = torch.Generator(device=setup.device).manual_seed(seed)
    shape = (setup.batch, setup.heads, setup.length, setup.dim)

    def randn(*size):
        return torch.randn(*size, generator=gen, device=setup.device)

    tensors = {
        "q": F.normalize(randn(*shape), dim=-1),
        "k": F.normalize(randn(*shape), dim=-1),
        "v": randn(*shape),
        "lr": 1e-2 * randn(*shape[:3]).sigmoid(),
        "beta": (randn(*shape[:3]) + 2).sigmoid(),
        "lam": 1e-2 * randn(*shape[:3]).sigmoid(),
    }
    tensors = {name: t.bfloat16().requires_grad_() for name, t in tensors.items()}
    for i, (rows, cols) in enumerate(weight_shapes(rule.structure, setup.dim, setup.dim)):
        tensors[f"w{i}"] = (randn(setup.batch, setup.heads, rows, cols) * cols**-0.5).requires_grad_()
    return tensors


def network_step(apply, rule: Rule, x: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    """One call as a layer makes it: bf16 activations cast to float32, the state's precision (nlc.runtime)."""
    from nlc.ops.memory.naive import initial_state

    def step():
        f = {name: t.float() for name, t in x.items()}
        gates = Gates(lr=f["lr"], beta=f["beta"] if rule.update == "momentum" else None, lam=f["lam"] if rule.retention == "weight_decay" else None)
        return apply(f["q"], f["k"], f["v"], gates, rule, initial_state(rule, (f["w0"], f["w1"])))[0]

    return step


def time_forward(step: Callable[[], torch.Tensor], reps: int) -> float:
    """Median seconds of a forward without autograd (inference, or a stream of states), after two warm-ups."""
    with torch.no_grad():
        return statistics.median([seconds_of(step) for _ in range(reps + 2)][2:])


def compare_network(setup: Setup, rule: Rule, forward_only: bool) -> list[Row]:
    """nlc's Triton MLP-memory kernels (forward, and the backward kernels) against the chunked PyTorch path (the
    dual form) on the same inputs, both with tf32 matmul operands."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return _compare_network(setup, rule, forward_only)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def _compare_network(setup: Setup, rule: Rule, forward_only: bool) -> list[Row]:
    from nlc.ops.network import chunk

    x = network_inputs(setup, rule)
    leaves = list(x.values())
    mode = "forward only" if forward_only else "fwd+bwd"
    if forward_only:
        with matmul_flop_counter() as counter, torch.no_grad():
            network_step(chunk.apply, rule, x)()
        flops = counter.get_total_flops()
    else:
        flops = counted_flops(network_step(chunk.apply, rule, x))
    timed = None if forward_only else leaves
    candidates = []
    try:
        from nlc.ops.network import triton as triton_path

        if not triton_path.supports(rule, Gates(lr=x["lr"], beta=x["beta"], lam=x["lam"]), x["q"].float()):
            raise ImportError(f"the kernel does not support {rule.structure} at d = {setup.dim} on {setup.device}")
        candidates.append(Candidate(f"nlc triton, {mode}", network_step(triton_path.apply, rule, x), leaves=timed))
    except ImportError as err:
        candidates.append(Candidate(f"nlc triton, {mode}", None, f"not usable ({err})"))
    candidates.append(Candidate(f"nlc chunk (PyTorch), {mode}", network_step(chunk.apply, rule, x), leaves=timed))
    return measure(candidates, setup.reps, flops)


def bench_network_titans(setup: Setup) -> list[Row]:
    return compare_network(setup, network_rule(setup), forward_only=False)


def bench_network_titans_forward(setup: Setup) -> list[Row]:
    return compare_network(setup, network_rule(setup), forward_only=True)


def bench_network_cms_level(setup: Setup) -> list[Row]:
    """A CMS level learning in context (objective l2): gd, chunk writes every 64 tokens, stop-gradient writes."""
    return compare_network(setup, network_rule(setup, update="gd", retention="none", batch=1, every=64, grad="stop"), forward_only=False)


def compare_cms_write(setup: Setup, momentum: bool) -> list[Row]:
    """nlc's fused fold-and-write kernel against the PyTorch ops it replaces (`nlc/ops/cms/naive.py`), eager
    and under torch.compile, on the same float32 tensors."""
    from nlc.ops.cms import naive

    width = setup.heads * setup.dim
    shapes = ((setup.batch, 1, 4 * width, width), (setup.batch, 1, width, 4 * width))  # W1, W2 [B, 1, out, in]
    gen = torch.Generator(device=setup.device).manual_seed(0)

    def weights():
        return tuple(1e-2 * torch.randn(shape, generator=gen, device=setup.device) for shape in shapes)

    delta, pending, grads = weights(), weights(), weights()
    state = weights() if momentum else None
    lr, beta = 1e-2, 0.9
    moved = (6 if momentum else 4) * sum(d.numel() * d.element_size() for d in delta)

    def step_of(update):
        def step():
            return update(delta, state, pending, [grads], lr, beta, True)[0]

        return step

    candidates = []
    try:
        from nlc.ops.cms import triton as triton_path

        if not triton_path.supports(delta, state, pending, [grads]):
            raise ImportError(f"the kernel does not support these tensors (on {setup.device})")
        candidates.append(Candidate("nlc triton", step_of(triton_path.chunk_update)))
    except ImportError as err:
        candidates.append(Candidate("nlc triton", None, f"not usable ({err})"))
    candidates.append(Candidate("PyTorch ops", step_of(naive.chunk_update)))
    candidates.append(Candidate("PyTorch ops compiled", step_of(torch.compile(naive.chunk_update, fullgraph=True))))
    return measure(candidates, setup.reps, reads=lambda new_delta: torch.cat([d.flatten() for d in new_delta]), bytes_moved=moved)


def bench_cms_task_write_gd(setup: Setup) -> list[Row]:
    return compare_cms_write(setup, momentum=False)


def bench_cms_task_write_momentum(setup: Setup) -> list[Row]:
    return compare_cms_write(setup, momentum=True)


BENCHES: list[Callable[[Setup], list[Row]]] = [
    bench_matrix_delta,
    bench_matrix_gated_delta,
    bench_matrix_linear_attention_decay,
    bench_matrix_linear_attention_momentum,
    bench_matrix_l2_momentum,
    bench_network_titans,
    bench_network_titans_forward,
    bench_network_cms_level,
    bench_cms_task_write_gd,
    bench_cms_task_write_momentum,
]

# what a bench times, where it is not bf16 forward + backward
MEASURED = {
    bench_matrix_l2_momentum: "bf16 inputs in float32 (tf32), forward+backward",
    bench_network_titans_forward: "bf16, forward",
    bench_cms_task_write_gd: "float32, one fold and write of a level's weights",
    bench_cms_task_write_momentum: "float32, one fold and write of a level's weights",
}


def print_table(title: str, rows: list[Row], setup: Setup) -> None:
    tokens = setup.batch * setup.length
    first = next((r.seconds for r in rows if r.seconds is not None), None)
    print(f"\n{title}")
    print(f"| {'implementation':<32} | {'tokens/s':>11} | {'TFLOP/s':>8} | {'% peak':>7} | {'vs first':>8} | {'rRMSE':>8} |")
    print(f"|{'-' * 34}|{'-' * 13}|{'-' * 10}|{'-' * 9}|{'-' * 10}|{'-' * 10}|")
    for row in rows:
        if row.seconds is None:
            print(f"| {row.name:<32} | skipped: {row.note}")
            continue
        achieved = row.flops / row.seconds if row.flops else None
        tflops = f"{achieved / 1e12:8.1f}" if achieved else f"{'':>8}"
        share = f"{100 * achieved / setup.peak_flops:6.1f}%" if achieved else f"{'':>7}"
        error = f"{row.rel_rmse:8.1e}" if row.rel_rmse is not None else f"{'':>8}"
        print(f"| {row.name:<32} | {tokens / row.seconds:11.0f} | {tflops} | {share} | {first / row.seconds:7.2f}x | {error} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--B", type=int, default=8)
    parser.add_argument("--H", type=int, default=16)
    parser.add_argument("--T", type=int, default=4096)
    parser.add_argument("--d", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--only", default="", help="run only the benches whose name contains this")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench.gpu measures GPU kernels and needs a CUDA device: torch.cuda.is_available() is False here.")

    torch.manual_seed(0)
    peak = matmul_peak()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 matmul (8192^3): {peak / 1e12:.1f} TFLOP/s")
    for dim in args.d:
        setup = Setup(args.B, args.H, args.T, dim, args.reps, peak)
        for bench in BENCHES:
            if args.only in bench.__name__:
                measured = MEASURED.get(bench, "bf16, forward+backward")
                title = f"{bench.__name__.removeprefix('bench_')}: B={args.B} H={args.H} T={args.T} d={dim} {measured}"
                print_table(title, bench(setup), setup)
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
