"""CPU throughput of the chunked matrix memory (forward + backward), as ratios against baselines timed in the same run.

    .venv/bin/python -m bench.cpu_memory [--T 2048] [--oracle-T 128] [--reps 5] [--threads N]

Rows: the chunked delta rule and gated delta rule (nlc.ops.matrix.chunk), fla's pure-PyTorch
`delta_rule_chunkwise` (chunk 64), causal `scaled_dot_product_attention`, and the token-loop oracle at a
shorter length. The implementations take turns in each of --reps rounds; each keeps its best time. GFLOP/s counts the matmul FLOPs that torch's FlopCounterMode sees (triangular solves are not
counted, so the figure is a lower bound) and is compared with a large `torch.matmul` timed here too.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import time

import torch
import torch.nn.functional as F

from bench.flops import matmul_flop_counter
from nlc.ops.matrix import chunk
from nlc.ops.memory.rule import Gates, MemoryState, Rule


def inputs(batch, heads, length, dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, dim, generator=gen)
    k = F.normalize(torch.randn(batch, heads, length, dim, generator=gen), dim=-1)
    v = torch.randn(batch, heads, length, dim, generator=gen)
    lr = torch.rand(batch, heads, length, generator=gen).sigmoid()
    alpha = (torch.rand(batch, heads, length, generator=gen) * 4 + 2).sigmoid()
    m0 = torch.zeros(batch, heads, dim, dim)
    return [t.requires_grad_() for t in (q, k, v, lr, alpha, m0)]


def nlc_step(rule, fn=chunk.apply):
    def step(q, k, v, lr, alpha, m0):
        gates = Gates(lr=lr, alpha=alpha if rule.retention == "decay" else None)
        o, _ = fn(q, k, v, gates, rule, MemoryState(weights=(m0,)))
        return o

    return step


def fla_step():
    # Loaded by path: importing the `fla.ops` package pulls in Triton, the reference itself needs only torch/einops.
    spec = importlib.util.find_spec("fla")
    if spec is None:
        return None, "flash-linear-attention is not installed"
    path = pathlib.Path(spec.submodule_search_locations[0]) / "ops" / "delta_rule" / "naive.py"
    module_spec = importlib.util.spec_from_file_location("fla_delta_rule_naive", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)

    def step(q, k, v, lr, alpha, m0):
        o, _ = module.delta_rule_chunkwise(q, k, v, lr, chunk_size=64)
        return o

    return step, None


def sdpa_step(q, k, v, lr, alpha, m0):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def oracle_step():
    try:
        from nlc.ops.memory.naive import memory_naive
    except ImportError as err:
        return None, f"oracle not importable ({err})"
    return nlc_step(Rule(), memory_naive), None


def fwd_bwd_seconds(step, tensors):
    """Wall time of one forward + backward."""
    for t in tensors:
        t.grad = None
    start = time.perf_counter()
    out = step(*tensors)
    out.backward(torch.ones_like(out))
    return time.perf_counter() - start


def best_seconds(steps: dict, tensors, rounds: int) -> dict:
    """Best wall time of each step's forward + backward after one warm-up. The steps take turns within each
    round, so a change in the machine's load during the run falls on all of them alike."""
    for step in steps.values():
        fwd_bwd_seconds(step, tensors)
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(rounds):
        for name, step in steps.items():
            best[name] = min(best[name], fwd_bwd_seconds(step, tensors))
    return best


def matmul_flops(step, tensors):
    with matmul_flop_counter() as counter:
        out = step(*tensors)
        out.backward(torch.ones_like(out))
    return counter.get_total_flops()


def matmul_gflops(size=2048, reps=5):
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--B", type=int, default=4)
    parser.add_argument("--H", type=int, default=4)
    parser.add_argument("--T", type=int, default=2048)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--oracle-T", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5, help="timed rounds; the best of each is kept")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = (args.B, args.H, args.T, args.d)
    print(
        f"B={args.B} H={args.H} T={args.T} d={args.d} float32, forward+backward, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}"
    )

    peak = matmul_gflops()
    tensors = inputs(*shape)
    steps = {"nlc chunk delta rule": nlc_step(Rule()), "nlc chunk gated delta rule": nlc_step(Rule(retention="decay"))}
    fla, why_no_fla = fla_step()
    if fla is not None:
        steps["fla delta_rule_chunkwise (C=64)"] = fla
    steps["causal SDPA"] = sdpa_step
    seconds = best_seconds(steps, tensors, args.reps)
    rows = []  # (name, tokens, seconds, flops or None, note)
    for name, step in steps.items():
        flops = None if step is sdpa_step else matmul_flops(step, tensors)
        rows.append((name, args.B * args.T, seconds[name], flops, ""))
    if fla is None:
        rows.insert(2, ("fla delta_rule_chunkwise (C=64)", None, None, None, why_no_fla))

    step, why = oracle_step()
    if step is None:
        rows.append((f"oracle token loop (T={args.oracle_T})", None, None, None, why))
    else:
        short = inputs(args.B, args.H, args.oracle_T, args.d)
        rows.append((f"oracle token loop (T={args.oracle_T})", args.B * args.oracle_T, best_seconds({"oracle": step}, short, 1)["oracle"], None, ""))

    ours = rows[0][1] / rows[0][2]
    print(f"large matmul (2048^3): {peak:.1f} GFLOP/s")
    print(f"| {'implementation':<36} | {'tokens/s':>10} | {'nlc delta / this':>16} | {'GFLOP/s':>8} | {'% matmul':>8} |")
    print(f"|{'-' * 38}|{'-' * 12}|{'-' * 18}|{'-' * 10}|{'-' * 10}|")
    for name, tokens, seconds, flops, note in rows:
        if seconds is None:
            print(f"| {name:<36} | skipped: {note}")
            continue
        rate = tokens / seconds
        gflops = f"{flops / seconds / 1e9:8.1f}" if flops else f"{'':>8}"
        share = f"{100 * flops / seconds / 1e9 / peak:7.1f}%" if flops else f"{'':>8}"
        print(f"| {name:<36} | {rate:10.0f} | {ours / rate:15.2f}x | {gflops} | {share} |")


if __name__ == "__main__":
    main()
