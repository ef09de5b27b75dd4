"""Optimisers as memories, measured against each other in the same run.

    .venv/bin/python -m bench.optimizers [--plot docs/img/optimizers_toy.png]

Part 1, the toy problem of the Nested Learning paper (its Fig. 4):

    psi(r, theta) = r^2 + K (r - theta + ALPHA sin(OMEGA r))^2,   from (r, theta) = (-3.5, 2)

Its only minimum is (0, 0); for every r the best theta lies on the curved valley
theta = r + ALPHA sin(OMEGA r), whose walls steepen with K. A run reaches the optimum at the
first step where ||(r, theta)|| < TOLERANCE; it fails if it has not within MAX_STEPS steps or
diverges. Every optimiser gets its best hyper-parameters from the same learning-rate grid
(and its own extra grid), so the comparison is between tuned optimisers; a second table
holds beta and the inner learning rate fixed and sweeps the learning rate.

Part 2 (`--part 2`), a small generated model on the built-in corpus: the Transformer++ of
`specs/bench/transformer_small.nl` (2 blocks of width 64) trained from the same initial weights
on the same batches for the same steps (warm-up and cosine schedule, clipping at 1) with AdamW,
Muon, M3 and DMGD (deep momentum), each at every learning rate of its grid: final validation
bits per byte on fixed held-out windows, and training time (validation excluded). Muon and M3
leave the embedding (tied with the output head) and the vectors to their built-in AdamW, whose
learning rate follows the same schedule.

    .venv/bin/python -m bench.optimizers --part 2 --steps 300 --plot docs/img/optimizers_train.png

`compare(names, train, grids)` is the harness: it builds each named optimiser through
`nlc.optim.make_optimizer` for each point of its grid and hands a factory to `train`, which
owns the problem: the toy problem in part 1, `train_corpus` in part 2.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import pathlib
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from nlc.optim import make_optimizer
from nlc.optim.muon import matrix_param_groups
from nlc.spec.schema import Cosine

K, ALPHA, OMEGA = 10.0, 0.5, 3.0
START = (-3.5, 2.0)
TOLERANCE = 1e-3
MAX_STEPS = 3000

LEARNING_RATES = [round(0.003 * 1.25**i, 6) for i in range(13)]  # 0.003 .. 0.044, geometric
BETAS = [0.8, 0.9, 0.95]
INNER_LRS = [0.1, 1.0]

OptimizerFactory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


def compare(names: Sequence[str], train: Callable[[OptimizerFactory], dict], grids: dict[str, list[dict]]) -> list[dict]:
    """One row per (optimiser, grid point): the name, its keyword arguments and what `train` returned."""
    rows = []
    for name in names:
        for kwargs in grids[name]:

            def factory(params, name=name, kwargs=kwargs):
                return make_optimizer(name, params, **kwargs)

            rows.append({"name": name, "kwargs": kwargs, **train(factory)})
    return rows


def grid(**axes) -> list[dict]:
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]


def psi(r, theta):
    return r**2 + K * (r - theta + ALPHA * torch.sin(OMEGA * r)) ** 2


def train_toy(factory: OptimizerFactory) -> dict:
    """Minimise psi from START; steps is None when the tolerance is not reached."""
    x = torch.nn.Parameter(torch.tensor(START, dtype=torch.float64))
    optimizer = factory([x])
    trajectory = [x.detach().clone()]
    steps = None
    for t in range(1, MAX_STEPS + 1):
        optimizer.zero_grad()
        psi(x[0], x[1]).backward()
        optimizer.step()
        trajectory.append(x.detach().clone())
        if not torch.isfinite(x).all() or x.detach().norm() > 1e6:
            break
        if x.detach().norm() < TOLERANCE:
            steps = t
            break
    return {"steps": steps, "trajectory": torch.stack(trajectory)}  # trajectory: [steps + 1, 2]


def best(rows: list[dict], name: str) -> dict | None:
    finished = [row for row in rows if row["name"] == name and row["steps"] is not None]
    return min(finished, key=lambda row: row["steps"]) if finished else None


def format_kwargs(kwargs: dict) -> str:
    return ", ".join(f"{key}={value:g}" for key, value in kwargs.items())


def part1(plot_path: pathlib.Path | None) -> None:
    tuned = compare(
        ["sgd", "momentum", "delta_momentum"],
        train_toy,
        {
            "sgd": grid(lr=LEARNING_RATES),
            "momentum": grid(lr=LEARNING_RATES, beta=BETAS),
            "delta_momentum": grid(lr=LEARNING_RATES, beta=BETAS, inner_lr=INNER_LRS),
        },
    )
    print(
        f"psi(r, theta) = r^2 + {K:g} (r - theta + {ALPHA:g} sin({OMEGA:g} r))^2 from {START}, steps until ||(r, theta)|| < {TOLERANCE:g} (max {MAX_STEPS})\n"
    )
    print("Tuned (best over the grid):\n")
    print("| optimiser | best hyper-parameters | steps | vs momentum |")
    print("|---|---|---|---|")
    momentum_steps = best(tuned, "momentum")["steps"]
    for name in ["sgd", "momentum", "delta_momentum"]:
        row = best(tuned, name)
        if row is None:
            print(f"| {name} | - | not reached | - |")
            continue
        print(f"| {name} | {format_kwargs(row['kwargs'])} | {row['steps']} | {row['steps'] / momentum_steps:.2f}x |")

    beta, inner_lr = 0.9, 1.0
    print(f"\nSame learning rate, beta = {beta:g}, delta momentum inner_lr = {inner_lr:g} (- : not reached):\n")
    print("| lr | momentum | delta_momentum |")
    print("|---|---|---|")
    for row_m, row_d in zip(
        [r for r in tuned if r["name"] == "momentum" and r["kwargs"]["beta"] == beta],
        [r for r in tuned if r["name"] == "delta_momentum" and r["kwargs"]["beta"] == beta and r["kwargs"]["inner_lr"] == inner_lr],
    ):
        if row_m["steps"] is None and row_d["steps"] is None:
            continue
        cells = [str(r["steps"]) if r["steps"] is not None else "-" for r in (row_m, row_d)]
        print(f"| {row_m['kwargs']['lr']:g} | {cells[0]} | {cells[1]} |")

    if plot_path is not None:
        tuned_runs = {name: best(tuned, name) for name in ["momentum", "delta_momentum"]}
        lr = tuned_runs["momentum"]["kwargs"]["lr"]
        same_lr_runs = {
            name: next(r for r in tuned if r["name"] == name and r["kwargs"] == kwargs)
            for name, kwargs in [
                ("momentum", {"lr": lr, "beta": beta}),
                ("delta_momentum", {"lr": lr, "beta": beta, "inner_lr": inner_lr}),
            ]
        }
        plot(plot_path, [("each at its best", tuned_runs), (f"same lr = {lr:g}", same_lr_runs)])
        print(f"\nplot: {plot_path}")


def plot(path: pathlib.Path, panels: list[tuple[str, dict[str, dict]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = torch.cat([run["trajectory"] for _, runs in panels for run in runs.values()])  # [N, 2]
    low, high = points.min(0).values - 0.5, points.max(0).values + 0.5
    r, theta = torch.meshgrid(
        torch.linspace(low[0].item(), high[0].item(), 400),
        torch.linspace(low[1].item(), high[1].item(), 400),
        indexing="ij",
    )
    values = psi(r, theta)
    levels = torch.logspace(-2, math.log10(values.max().item()), 20).numpy()
    figure, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.5), sharey=True)
    for ax, (title, runs) in zip(axes, panels):
        ax.contour(r.numpy(), theta.numpy(), values.numpy(), levels=levels, cmap="viridis", linewidths=0.6, alpha=0.6)
        for (name, run), colour in zip(runs.items(), ["tab:blue", "tab:red"]):
            xy = run["trajectory"].numpy()
            steps = run["steps"] if run["steps"] is not None else f"> {MAX_STEPS}"
            label = f"{name} ({format_kwargs(run['kwargs'])}): {steps} steps"
            ax.plot(xy[:, 0], xy[:, 1], "-", color=colour, linewidth=1.0, marker=".", markersize=2, label=label)
        ax.plot(*START, "ko")
        ax.plot(0, 0, "k*", markersize=12)
        ax.set_xlabel("r")
        ax.set_title(title)
        ax.legend(loc="lower right", fontsize=7)
    axes[0].set_ylabel("theta")
    figure.suptitle(f"psi = r^2 + {K:g} (r - theta + {ALPHA:g} sin({OMEGA:g} r))^2, from {START}")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")


SMALL_SPEC = pathlib.Path(__file__).resolve().parent.parent / "specs" / "bench" / "transformer_small.nl"
TRAIN_NAMES = ["adamw", "muon", "m3", "deep_momentum"]
SCHEDULE = Cosine(warmup=30, min_lr=0.1)  # linear warm-up, then cosine down to min_lr x the peak
CLIP = 1.0
EMBEDDING_ADAMW_LR = 3e-3  # Muon's and M3's AdamW part (embedding, gains), the same in every run
TRAIN_GRIDS = {
    "adamw": grid(lr=[1e-3, 3e-3, 1e-2, 3e-2], betas=[(0.9, 0.95)], weight_decay=[0.1]),
    "muon": grid(lr=[0.01, 0.02, 0.05, 0.1], adamw_lr=[EMBEDDING_ADAMW_LR]),
    "m3": grid(lr=[1e-4, 3e-4, 1e-3, 3e-3], adamw_lr=[EMBEDDING_ADAMW_LR]),
    "deep_momentum": grid(lr=[3e-3, 1e-2, 3e-2]),
}


def make_train_corpus(steps: int, batch: int, context: int, seed: int, eval_every: int) -> Callable[[OptimizerFactory], dict]:
    """A `train` for `compare`: the small model on the corpus, the same weights and batches for every optimiser."""
    import nlc
    from nlc.train.data import corpus_data
    from nlc.train.loop import evaluate, lr_factor

    data = corpus_data()
    validation = data.validation(batch, context, 4)
    model_name = SMALL_SPEC.stem

    def train_corpus(factory: OptimizerFactory) -> dict:
        torch.manual_seed(seed)
        model = nlc.load(str(SMALL_SPEC), model_name)
        groups = matrix_param_groups(model.named_parameters())
        optimizer = factory(groups)  # every optimiser takes the same two groups; only Muon and M3 read "matrix"
        peaks = [{key: group[key] for key in ("lr", "adamw_lr") if key in group} for group in optimizer.param_groups]
        generator = torch.Generator().manual_seed(seed)
        losses, curve, diverged = [], [], None
        start = time.perf_counter()
        for step in range(1, steps + 1):
            for group, peak in zip(optimizer.param_groups, peaks):
                group.update({key: value * lr_factor(SCHEDULE, step, steps) for key, value in peak.items()})
            tokens, targets = data.batch(generator, batch, context)  # [B, T] each
            logits, _ = model(tokens)  # [B, T, vocab]
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
            if not torch.isfinite(loss):
                diverged = step
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            optimizer.step()
            losses.append(loss.item() / math.log(2))
            if step % eval_every == 0 or step == steps:
                paused = time.perf_counter()
                model.eval()
                curve.append((step, evaluate(model, validation, None, "cpu", contextlib.nullcontext)))
                model.train()
                start += time.perf_counter() - paused  # the wall time is the training's, validation excluded
        wall = time.perf_counter() - start
        final = curve[-1][1] if diverged is None and curve else None
        return {"val_bpb": final, "diverged": diverged, "wall_s": wall, "train_bits": losses, "curve": curve}

    return train_corpus


def part2(steps: int, batch: int, context: int, seed: int, plot_path: pathlib.Path | None) -> None:
    eval_every = max(1, steps // 10)
    train_corpus = make_train_corpus(steps, batch, context, seed, eval_every)
    print(
        f"{SMALL_SPEC.name}: {steps} steps of {batch} x {context} bytes of the corpus, seed {seed}, warm-up {SCHEDULE.warmup}, "
        f"cosine to {SCHEDULE.min_lr:g} x peak, clip {CLIP:g}; validation on 4 x {batch} held-out windows; {torch.get_num_threads()} threads\n"
    )
    rows = compare(TRAIN_NAMES, train_corpus, TRAIN_GRIDS)
    print("| optimiser | hyper-parameters | validation bits per byte | training time (s) |")
    print("|---|---|---|---|")
    for row in rows:
        bpb = f"{row['val_bpb']:.4f}" if row["val_bpb"] is not None else f"diverged at step {row['diverged']}"
        print(f"| {row['name']} | {format_hyper(row['kwargs'])} | {bpb} | {row['wall_s']:.1f} |")
    best_rows = {}
    for name in TRAIN_NAMES:
        finished = [row for row in rows if row["name"] == name and row["val_bpb"] is not None]
        if finished:
            best_rows[name] = min(finished, key=lambda row: row["val_bpb"])
    adamw = best_rows.get("adamw")
    print("\nEach at its best learning rate:\n")
    print("| optimiser | lr | validation bits per byte | vs AdamW | training time (s) | vs AdamW |")
    print("|---|---|---|---|---|---|")
    for name in TRAIN_NAMES:
        row = best_rows.get(name)
        if row is None:
            print(f"| {name} | - | diverged at every lr | - | - | - |")
            continue
        ratios = (f"{row['val_bpb'] - adamw['val_bpb']:+.4f}", f"{row['wall_s'] / adamw['wall_s']:.2f}x") if adamw else ("-", "-")
        print(f"| {name} | {row['kwargs']['lr']:g} | {row['val_bpb']:.4f} | {ratios[0]} | {row['wall_s']:.1f} | {ratios[1]} |")
    if plot_path is not None:
        plot_training(plot_path, best_rows, steps, batch, context)
        print(f"\nplot: {plot_path}")


def format_hyper(kwargs: dict) -> str:
    return ", ".join(f"{key}={value}" if isinstance(value, tuple) else f"{key}={value:g}" for key, value in kwargs.items())


def plot_training(path: pathlib.Path, best_rows: dict[str, dict], steps: int, batch: int, context: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (train_axes, val_axes) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    window = min(10, steps)
    for name, row in best_rows.items():
        bits = torch.tensor(row["train_bits"])  # [steps]
        smooth = bits.unfold(0, window, 1).mean(dim=1)  # [steps - window + 1], the mean of the last `window` steps
        label = f"{name} (lr {row['kwargs']['lr']:g})"
        train_axes.plot(range(window, len(bits) + 1), smooth.numpy(), linewidth=1, label=label)
        steps_at, bpb = zip(*row["curve"])
        val_axes.plot(steps_at, bpb, "o-", markersize=3, label=label)
    train_axes.set_title(f"training loss (mean of {window} steps)")
    val_axes.set_title("validation")
    for axes in (train_axes, val_axes):
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
    train_axes.set_ylabel("bits per byte")
    val_axes.legend()
    figure.suptitle(f"{SMALL_SPEC.name}, corpus, {steps} steps of {batch} x {context} bytes, each optimiser at its best lr")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", type=int, choices=[1, 2], default=1, help="1: the toy problem; 2: the small model on the corpus")
    parser.add_argument("--plot", type=pathlib.Path, default=None, help="save the plot here (PNG)")
    parser.add_argument("--steps", type=int, default=300, help="part 2: training steps")
    parser.add_argument("--batch", type=int, default=16, help="part 2: sequences per step")
    parser.add_argument("--context", type=int, default=128, help="part 2: bytes per sequence")
    parser.add_argument("--seed", type=int, default=0, help="part 2: weights and batches")
    args = parser.parse_args()
    if args.part == 1:
        torch.set_num_threads(1)  # scalar-sized problem: threads only add overhead
        part1(args.plot)
    else:
        part2(args.steps, args.batch, args.context, args.seed, args.plot)


if __name__ == "__main__":
    main()
