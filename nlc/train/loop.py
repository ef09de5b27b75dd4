"""The outer training loop of `nlc train`.

One step: draw a global batch of windows, forward and backward (piece by piece for models with a
`cms` of `objective = task`, see `sequence_loss`), clip, one optimiser step under the warm-up +
cosine (or constant) schedule. Every `eval_every` steps and at the last step: validation
bits-per-token on fixed held-out windows, a checkpoint, the plot. Everything random comes from
seeded generators whose states the checkpoint keeps, so a resumed run repeats the uninterrupted
one bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nlc.train.checkpoint import WEIGHTS, CheckpointError, check_spec, read_checkpoint, save_checkpoint, spec_sha256
from nlc.train.data import DataError, make_data, parse_data_flag
from nlc.train.distributed import World, close_world, init_world
from nlc.train.metrics import MetricsLog
from nlc.train.plot import plot_losses

IGNORE = -100  # targets without a loss (synthetic tasks)
EVAL_BATCHES = 4  # validation: this many fixed batches of held-out windows


class TrainError(Exception):
    """Training cannot start or cannot go on; the message says why."""


class SpecError(TrainError):
    """A mistake in the spec found only once the model exists; carries located diagnostics."""

    def __init__(self, diagnostics, sources):
        from nlc.diagnostics import render_text

        super().__init__(render_text(diagnostics, sources))
        self.diagnostics, self.sources = diagnostics, sources


class FlagError(TrainError):
    """A command-line value that cannot be used (a usage error: exit code 2)."""


class Diverged(TrainError):
    """The loss, a layer's state or a gradient went non-finite; the last good checkpoint is kept."""


@dataclass
class Options:
    """What `nlc train` was asked: the spec and the flags that override its `train` block (None: not given)."""

    spec: str
    name: str | None = None
    out: str | None = None
    steps: int | None = None
    until: int | None = None
    batch: int | None = None
    context: int | None = None
    lr: float | None = None
    data: str | None = None
    seed: int | None = None
    eval_every: int | None = None
    resume: bool = False
    device: str | None = None
    compile: bool = False
    progress: bool | None = None  # None: a progress bar when stderr is a terminal


@dataclass
class Settings:
    """The resolved run: spec defaults, then (on resume) the checkpoint's settings, then the flags."""

    spec_path: str
    spec_sha256: str
    model_name: str
    out: Path
    steps: int
    until: int
    batch: int
    context: int
    lr: float
    data: dict
    seed: int
    eval_every: int
    clip: float | None
    update: object  # nlc.spec.schema.OuterUpdate
    schedule: object  # nlc.spec.schema.Schedule
    levels: list
    device: str


OVERRIDABLE = ("steps", "batch", "context", "lr", "data", "seed", "eval_every")


def resolve(options: Options) -> tuple[Settings, tuple | None]:
    """Settings for the run, and the checkpoint to resume from as `read_checkpoint` returns it (None for a
    fresh run). Raises TrainError
    for anything wrong (the spec, the flags, the output directory) before any work starts."""
    from nlc.diagnostics import render_text
    from nlc.spec import load_spec

    if not Path(options.spec).is_file():
        raise FlagError(f"cannot read spec '{options.spec}': no such file")
    spec, diagnostics, sources = load_spec(options.spec)
    if diagnostics:
        raise TrainError("the spec has errors:\n" + render_text(diagnostics, sources))
    model = spec.get(options.name)
    if model is None or model.decl != "model":
        names = ", ".join(d.name for d in spec.decls if d.decl == "model") or "none"
        what = f"no model named '{options.name}'" if options.name else "no single model: name one"
        raise TrainError(f"{options.spec} declares {what} (models: {names})")
    train = model.train
    values = {
        "steps": train.steps,
        "batch": train.batch,
        "context": model.context,
        "lr": train.update.lr,
        "data": train.data.model_dump(),
        "seed": train.seed,
        "eval_every": train.eval_every,
    }
    out = Path(options.out or Path("runs") / model.name)
    checkpoint = meta = None
    if options.resume:
        try:
            checkpoint = read_checkpoint(out)
            meta = checkpoint[2]
            check_spec(meta, options.spec)
        except CheckpointError as e:
            raise TrainError(f"cannot resume: {e}") from None
        if meta["model_name"] != model.name:
            raise TrainError(f"cannot resume: the checkpoint in '{out}' is of model '{meta['model_name']}', not '{model.name}'")
        values.update({key: meta["settings"][key] for key in OVERRIDABLE})
    elif (out / WEIGHTS).exists():
        raise TrainError(f"'{out}' already holds a checkpoint: pass --resume to continue it, or choose another --out")
    for key in OVERRIDABLE:
        given = getattr(options, key)
        if given is not None:
            values[key] = given
    if options.data is not None:
        try:
            values["data"] = parse_data_flag(options.data).model_dump()
        except DataError as e:
            raise FlagError(str(e)) from None
    for key in ("steps", "batch", "context", "eval_every"):
        if values[key] < 1:
            raise FlagError(f"--{key.replace('_', '-')} must be at least 1, got {values[key]}")
    if values["lr"] <= 0 or not math.isfinite(values["lr"]):
        raise FlagError(f"--lr must be a positive number, got {values['lr']}")
    if values["seed"] < 0:
        raise FlagError(f"--seed must be at least 0, got {values['seed']}")
    until = options.until if options.until is not None else values["steps"]
    if not 1 <= until <= values["steps"]:
        raise FlagError(f"--until must lie between 1 and the number of steps ({values['steps']}), got {until}")
    if meta is not None and meta["step"] >= until:
        raise TrainError(f"nothing to do: the checkpoint in '{out}' is at step {meta['step']}, the run ends at step {until}")
    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise FlagError(f"--device {device}: not usable here ({str(e).splitlines()[0]})") from None
    settings = Settings(
        spec_path=str(Path(options.spec).resolve()),
        spec_sha256=spec_sha256(options.spec),
        model_name=model.name,
        out=out,
        until=until,
        clip=train.clip,
        update=train.update,
        schedule=train.schedule,
        levels=list(train.levels),
        device=device,
        **values,
    )
    return settings, checkpoint


def lr_factor(schedule, step: int, steps: int) -> float:
    """The learning rate of `step` (1-based) as a fraction of the peak: linear warm-up over `warmup` steps,
    then constant, or cosine down to `min_lr` at the last step."""
    if step <= schedule.warmup:
        return step / schedule.warmup
    if schedule.kind == "constant":
        return 1.0
    progress = (step - schedule.warmup) / max(1, steps - schedule.warmup)
    return schedule.min_lr + (1 - schedule.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(update, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The outer optimiser that a spec's `update` names, at peak learning rate lr."""
    if update.kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=update.betas, weight_decay=update.weight_decay, eps=update.eps)
    try:
        from nlc.optim import make_optimizer as make_named
    except ImportError:
        raise TrainError(f"the optimiser '{update.kind}' is not available in this installation (nlc.optim is missing)") from None
    arguments = {key: value for key, value in update.model_dump().items() if key not in ("kind", "memory")}
    if update.kind == "deep_momentum":
        arguments["depth"] = update.memory.depth
        arguments["hidden"] = max(1, round(update.memory.expand))
    try:
        return make_named(update.kind, params, **{**arguments, "lr": lr})
    except (ValueError, TypeError) as e:
        raise TrainError(f"optimiser '{update.kind}': {e}") from None


def build_optimizer(settings: Settings, model: nn.Module):
    """The main optimiser, or `nlc.optim.OuterLevels` when the train block declares levels."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not settings.levels:
        return make_optimizer(settings.update, params, settings.lr)
    from nlc.optim import LevelPatternError, OuterLevels

    levels = [(level.name, level.params, level.every, lambda ps, u=level.update or settings.update: make_optimizer(u, ps, u.lr)) for level in settings.levels]
    try:
        return OuterLevels(model, levels, main_optimizer_factory=lambda ps: make_optimizer(settings.update, ps, settings.lr))
    except LevelPatternError as e:
        from nlc.diagnostics import Diagnostic, SourceMap
        from nlc.spec.locate import train_level_pattern

        shown = os.path.relpath(settings.spec_path)
        found = train_level_pattern(settings.spec_path if shown.startswith("..") else shown, e.level, e.pattern)
        if found is None:
            raise TrainError(f"train levels: {e}") from None
        span, text = found
        code = "E207" if "claimed" in str(e) or "both" in str(e) else "E302"
        names = [n for n, _ in model.named_parameters()]
        note = f"parameters are named like {names[0]!r}" if names else "the model has no parameters"
        raise SpecError([Diagnostic(code, str(e), span, (note,))], SourceMap({span.path: text})) from None
    except ValueError as e:
        raise TrainError(f"train levels: {e}") from None


def task_chunk(model: nn.Module) -> int | None:
    """The chunk of the fastest level of any `cms` with `objective = task` (None without one)."""
    from nlc.runtime import CmsLayer

    chunks = [
        level.every
        for module in model.modules()
        if isinstance(module, CmsLayer) and module.cfg.objective == "task"
        for level in module.cfg.levels
        if level.every > 0
    ]
    return min(chunks) if chunks else None


def detach_state(state):
    """The in-context state with every tensor cut from the graph (truncated backprop at a piece boundary)."""
    if isinstance(state, torch.Tensor):
        return state.detach()
    if isinstance(state, dict):
        return {key: detach_state(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(detach_state(value) for value in state)
    if dataclasses.is_dataclass(state):
        return dataclasses.replace(state, **{f.name: detach_state(getattr(state, f.name)) for f in dataclasses.fields(state) if f.init})
    return state


def upcast(logits: torch.Tensor) -> torch.Tensor:
    """The loss in at least float32 (logits are bfloat16 under autocast)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def pieces_of(T: int, chunk: int | None) -> list[tuple[int, int]]:
    if chunk is None:
        return [(0, T)]
    return [(s, min(s + chunk, T)) for s in range(0, T, chunk)]


def sequence_loss(model: nn.Module, raw_model: nn.Module, tokens, targets, chunk: int | None, autocast) -> torch.Tensor:
    """Forward and backward of the summed next-token loss of one batch; returns it (detached).

    The gradients are those of the sum over tokens: the caller divides the outer ones by the token count.
    A task-objective `cms` thus receives, per sequence, the gradient of the sum of that sequence's token
    losses, the chunk gradient of LANGUAGE.md §4, independent of the batch size.

    With a task-objective `cms` the sequence goes in pieces of the fastest level's chunk: each piece's
    loss is backpropagated at once (the outer gradients accumulate), then `learn` writes the levels from
    the gradients their reads received, and the next piece reads the updated levels. The state is
    detached between pieces, so no gradient crosses a piece boundary (truncated backprop)."""
    pieces = pieces_of(tokens.shape[1], chunk)
    state, total = None, torch.zeros((), device=tokens.device, dtype=torch.float64)
    for i, (s, e) in enumerate(pieces):
        last = i == len(pieces) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast():
                logits, state = model(tokens[:, s:e], state)  # [B, e - s, vocab]
            loss = F.cross_entropy(upcast(logits).flatten(0, 1), targets[:, s:e].flatten(), ignore_index=IGNORE, reduction="sum")
            loss.backward()
        total += loss.detach()
        if chunk is not None and not last:
            state = detach_state(raw_model.learn(state))
    return total


@torch.no_grad()
def first_nonfinite(model: nn.Module, tokens, targets, chunk: int | None) -> str:
    """Name the layer where a forward first goes non-finite: the first sub-layer whose returned state holds a
    non-finite value, else the first module whose output does."""
    outputs: list[str] = []

    def watch(name):
        def hook(module, args, output):
            if not outputs and _has_nonfinite(output):
                outputs.append(name)

        return hook

    handles = [module.register_forward_hook(watch(name)) for name, module in model.named_modules() if name]
    try:
        state = None
        for s, e in pieces_of(tokens.shape[1], chunk):
            _, state = model(tokens[:, s:e], state)
            for i, block_state in enumerate(state):
                for layer, layer_state in (block_state or {}).items():
                    if _has_nonfinite(layer_state):
                        return f"the state of layer blocks.{i}.{layer} (tokens {s}..{e - 1})"
    finally:
        for handle in handles:
            handle.remove()
    return f"the output of {outputs[0]}" if outputs else "the loss (every layer's output is finite)"


def _has_nonfinite(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_floating_point() and not bool(torch.isfinite(value).all())
    if isinstance(value, dict):
        return any(_has_nonfinite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_nonfinite(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return any(_has_nonfinite(getattr(value, f.name)) for f in dataclasses.fields(value))
    return False


def evaluate(model: nn.Module, batches, chunk: int | None, device: str, autocast) -> float:
    """Validation bits per token: mean cross-entropy / ln 2 over the fixed held-out batches. A task-objective
    `cms` keeps learning in context here as in training (it needs the backward; outer gradients are dropped)."""
    total, count = 0.0, 0
    for tokens, targets in batches:
        tokens, targets = tokens.to(device), targets.to(device)
        n = int((targets != IGNORE).sum())
        if chunk is None:
            with torch.no_grad(), autocast():
                logits, _ = model(tokens)
            total += float(F.cross_entropy(upcast(logits).flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum"))
        else:
            total += float(sequence_loss(model, model, tokens, targets, chunk, autocast))
            model.zero_grad(set_to_none=True)
        count += n
    return total / max(count, 1) / math.log(2)


@dataclass
class Result:
    main: bool  # this process is the one that writes (rank 0)
    step: int
    loss: float
    val_bpb: float | None
    out: Path


def train(options: Options, log=None) -> Result:
    """Run `nlc train`. `log(text)` receives the progress lines (stderr by default)."""
    settings, checkpoint = resolve(options)
    world = init_world(settings.device)
    try:
        result = _train(settings, checkpoint, options, world, log or (lambda text: print(text, file=sys.stderr)))
        # the other processes wait for rank 0's last evaluation and checkpoint: a gloo group torn down
        # while a peer is still busy can abort the process that leaves first
        world.wait_for_all()
        return result
    finally:
        close_world(world)


def _train(settings: Settings, checkpoint: tuple | None, options: Options, world: World, log) -> Result:
    from pydantic import TypeAdapter

    import nlc
    from nlc.spec.schema import Data

    if settings.batch % world.size:
        raise TrainError(f"the batch ({settings.batch}) must divide evenly among the {world.size} processes")
    device = settings.device if not (world.distributed and settings.device == "cuda") else f"cuda:{world.local_rank}"
    try:
        data = make_data(TypeAdapter(Data).validate_python(settings.data), settings.context)
    except DataError as e:
        raise TrainError(str(e)) from None

    torch.manual_seed(settings.seed)
    raw_model = nlc.load(settings.spec_path, settings.model_name)
    if data.vocab > raw_model.config.vocab:
        raise TrainError(
            f"vocabulary mismatch: the data ({data.name}) has {data.vocab} tokens, the model '{settings.model_name}' "
            f"has vocab = {raw_model.config.vocab}; set vocab = {data.vocab} (or more) in the spec"
        )
    raw_model.to(device)
    optimizer = build_optimizer(settings, raw_model)
    optimizers = getattr(optimizer, "optimizers", [optimizer])
    peaks = [[group["lr"] for group in opt.param_groups] for opt in optimizers]
    generator = torch.Generator().manual_seed(settings.seed)
    start = 0
    if checkpoint is not None:
        state_dict, optimizer_state, meta = checkpoint
        raw_model.load_state_dict(state_dict)
        optimizer.load_state_dict(optimizer_state)
        generator.set_state(meta["rng"]["data"])
        torch.set_rng_state(meta["rng"]["torch"])
        start = meta["step"]
    if world.main:
        settings.out.mkdir(parents=True, exist_ok=True)
        metrics = MetricsLog(settings.out, resume_step=start if checkpoint is not None else None)

    model = raw_model
    if world.distributed:
        model = nn.parallel.DistributedDataParallel(raw_model, device_ids=[world.local_rank] if device.startswith("cuda") else None)
    if options.compile:
        model = torch.compile(model)
    chunk = task_chunk(raw_model)
    on_cuda = device.startswith("cuda")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if on_cuda else contextlib.nullcontext
    validation = data.validation(settings.batch, settings.context, EVAL_BATCHES) if world.main else []
    rows = slice(None) if not world.distributed else world.slice(settings.batch)
    params = [p for p in raw_model.parameters() if p.requires_grad]

    def save(step: int) -> None:
        meta = {
            "spec_path": settings.spec_path,
            "spec_sha256": settings.spec_sha256,
            "model_name": settings.model_name,
            "step": step,
            "context": settings.context,
            "vocab": raw_model.config.vocab,
            "settings": {key: getattr(settings, key) for key in OVERRIDABLE},
            "rng": {"data": generator.get_state(), "torch": torch.get_rng_state()},
            "nlc_version": nlc.__version__,
        }
        save_checkpoint(settings.out, raw_model, optimizer.state_dict(), meta)

    progress = _Progress(settings, start, options.progress, log) if world.main else _Progress(settings, start, False, None)
    loss_value, val_bpb = float("nan"), None
    with progress:
        for step in range(start + 1, settings.until + 1):
            t0 = time.perf_counter()
            factor = lr_factor(settings.schedule, step, settings.steps)
            for opt, opt_peaks in zip(optimizers, peaks):
                for group, peak in zip(opt.param_groups, opt_peaks):
                    group["lr"] = peak * factor
            tokens, targets = data.batch(generator, settings.batch, settings.context)  # [batch, context] each
            count = max(int((targets != IGNORE).sum()), 1)  # the loss is the mean over the global batch
            tokens, targets = tokens[rows].to(device), targets[rows].to(device)
            loss = world.sum(sequence_loss(model, raw_model, tokens, targets, chunk, autocast)) / count
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(world.size / count)  # DDP averaged the per-process sums over processes
            if not torch.isfinite(loss):
                raise Diverged(
                    f"step {step}: the loss is {float(loss)}; first non-finite value: {first_nonfinite(raw_model, tokens, targets, chunk)}{_kept(settings)}"
                )
            grad_norm = nn.utils.clip_grad_norm_(params, settings.clip or math.inf)
            if not torch.isfinite(grad_norm):
                bad = next((name for name, p in raw_model.named_parameters() if p.grad is not None and not bool(torch.isfinite(p.grad).all())), None)
                what = f"the gradient of {bad} is not finite" if bad else "the gradient norm overflows (every gradient is finite)"
                raise Diverged(f"step {step}: {what}{_kept(settings)}")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = float(loss)
            row = {
                "step": step,
                "loss": loss_value,
                "lr": optimizers[0].param_groups[0]["lr"],
                "tokens_per_s": settings.batch * settings.context / (time.perf_counter() - t0),
                "grad_norm": float(grad_norm),
            }
            if world.main:
                evaluating = step % settings.eval_every == 0 or step == settings.until
                if evaluating:
                    val_bpb = row["val_bpb"] = evaluate(raw_model, validation, chunk, device, autocast)
                metrics.log(row)  # before the checkpoint: a resumed run drops the rows after its step
                if evaluating:
                    save(step)
                    plot_losses(metrics.rows, settings.out)
            progress.update(row)
    return Result(main=world.main, step=settings.until, loss=loss_value, val_bpb=val_bpb, out=settings.out)


def _kept(settings: Settings) -> str:
    if (settings.out / WEIGHTS).exists():
        return f"; training stopped, the last good checkpoint in '{settings.out}' is kept"
    return "; training stopped before any checkpoint was written"


class _Progress:
    """A rich progress bar on a terminal; otherwise one line per evaluation."""

    def __init__(self, settings: Settings, start: int, enabled: bool | None, log):
        self.settings, self.start, self.log = settings, start, log
        self.bar = None
        if enabled is None:
            enabled = sys.stderr.isatty()
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("step {task.completed:>6.0f}/{task.total:.0f}"),
                BarColumn(),
                TextColumn("loss {task.fields[loss]}  {task.fields[speed]} tok/s"),
                TimeRemainingColumn(),
                console=Console(stderr=True),  # stdout stays free for a caller's pipe
            )
            self.task = self.bar.add_task("train", total=settings.until, completed=start, loss="-", speed="-")

    def __enter__(self):
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def update(self, row: dict) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=row["step"], loss=f"{row['loss']:.4f}", speed=f"{row['tokens_per_s']:,.0f}")
            if "val_bpb" in row:
                self.bar.console.print(f"step {row['step']}: validation {row['val_bpb']:.4f} bits per token")
        elif self.log is not None and "val_bpb" in row:
            self.log(
                f"step {row['step']}/{self.settings.steps}: loss {row['loss']:.4f}, validation {row['val_bpb']:.4f} bits per token, {row['tokens_per_s']:,.0f} tokens/s"
            )
