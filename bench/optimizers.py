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

`compare(names, train, grids)` is the harness: it builds each named optimiser through
`nlc.optim.make_optimizer` for each point of its grid and hands a factory to `train`, which
owns the problem. Part 1's `train` is the toy problem; a model-training `train` plugs in
the same way.
"""

from __future__ import annotations

import argparse
import itertools
import math
import pathlib
from collections.abc import Callable, Sequence

import torch

from nlc.optim import make_optimizer

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plot", type=pathlib.Path, default=None, help="save the trajectory plot here (PNG)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # scalar-sized problem: threads only add overhead
    part1(args.plot)


if __name__ == "__main__":
    main()
