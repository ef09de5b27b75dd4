"""Evaluation: accuracy on the synthetic tasks (per length for niah), validation bits per byte, and
streaming a long document through the model with its in-context state carried.

Every sequence is read by `read`: in pieces of at most the model's context with the state carried,
which computes the same logits as one call (the state is explicit, ARCHITECTURE.md) and bounds the
memory of one call on sequences longer than the training context. A `cms` with `objective = task`
writes only after a backward, so for such a model the pieces are its fastest level's chunk and each
piece's loss is back-propagated to the levels' fast weights before the next piece, exactly as the
training loop does (`nlc.train.loop.sequence_loss`): it keeps learning in context here too. The
outer parameters never change and never receive a gradient.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nlc.train.data import ByteData, windows
from nlc.train.loop import IGNORE, detach_state, task_chunk, upcast
from nlc.train.tasks import Task


@contextlib.contextmanager
def outer_frozen(model: nn.Module):
    """Evaluation mode, the outer parameters out of every graph; both restored on exit."""
    was_training, grads = model.training, [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
        model.train(was_training)


def read(model: nn.Module, tokens: Tensor, targets: Tensor, piece: int, state=None) -> tuple[Tensor, Tensor, object]:
    """(logits `[B, T, V]`, per-token loss `[B, T]` in nats (0 where targets are -100), state) of tokens
    `[B, T]` read `piece` tokens at a time (the chunk of a task-objective `cms`, if smaller) with the
    state carried. Call under `outer_frozen`."""
    chunk = task_chunk(model)
    step = piece if chunk is None else min(piece, chunk)
    B, T = tokens.shape
    logits, losses = [], []
    for s in range(0, T, step):
        e = min(s + step, T)
        with torch.set_grad_enabled(chunk is not None):
            out, state = model(tokens[:, s:e], state)  # [B, e - s, V]
            loss = F.cross_entropy(upcast(out).flatten(0, 1), targets[:, s:e].flatten(), ignore_index=IGNORE, reduction="none")  # [B * (e - s)]
            if loss.requires_grad:
                loss.sum().backward()  # the levels' gradient of the sum of each sequence's losses, as in training
                state = model.learn(state)
        state = detach_state(state)
        logits.append(out.detach())
        losses.append(loss.detach().view(B, e - s))
    return torch.cat(logits, dim=1), torch.cat(losses, dim=1), state


def task_accuracy(model: nn.Module, task: Task, generator: torch.Generator, batches: int, batch: int, context: int, piece: int) -> float:
    """Exact-match accuracy over the answer tokens of `batches` fresh batches of `context` tokens."""
    correct, answers = 0.0, 0
    with outer_frozen(model):
        for _ in range(batches):
            tokens, targets = task.batch(generator, batch, context)  # [B, T] each
            logits, _, _ = read(model, tokens, targets, piece)  # [B, T, V]
            n = int((targets != IGNORE).sum())
            correct += task.accuracy(logits, targets) * n
            answers += n
    return correct / answers


def bits_per_byte(model: nn.Module, data: ByteData, generator: torch.Generator, batches: int, batch: int, context: int) -> float:
    """Mean next-byte cross-entropy on held-out windows of `context` bytes, in bits."""
    total, count = 0.0, 0
    with outer_frozen(model):
        for _ in range(batches):
            tokens, targets = windows(data.held_out, generator, batch, context)  # [B, T] each
            _, losses, _ = read(model, tokens, targets, context)  # [B, T]
            total += losses.sum().item()
            count += targets.numel()
    return total / count / math.log(2)


@dataclass
class StreamResult:
    losses: Tensor  # [N - 1] per-token loss in nats: losses[t] is the loss of predicting byte t + 1
    segments: list[tuple[int, int, float]]  # (start, end, mean loss in nats) of each segment, in order


def stream(model: nn.Module, data: Tensor, segment: int, carry: bool = True) -> StreamResult:
    """Read a document (`[N]` token ids) `segment` tokens at a time with the state carried, so that
    every memory, and every `cms` (see `read`), keeps learning across segments. Each segment's logits
    also predict the first token of the next segment, so every token but the first is scored exactly
    once. With `carry=False` every segment starts from a fresh state: the baseline that shows what the
    carried state is worth."""
    tokens = data.long()[None]  # [1, N]
    losses, segments, state = [], [], None
    with outer_frozen(model):
        for start in range(0, tokens.shape[1] - 1, segment):
            end = min(start + segment, tokens.shape[1] - 1)
            _, loss, state = read(model, tokens[:, start:end], tokens[:, start + 1 : end + 1], segment, state if carry else None)  # [1, t]
            losses.append(loss[0])
            segments.append((start, end, loss.mean().item()))
    return StreamResult(losses=torch.cat(losses), segments=segments)


def plot_stream(curves: dict[str, StreamResult], path: str, title: str) -> None:
    """Loss against position (the in-context learning curve) of each named stream: the mean of each
    segment, and faintly the per-token loss averaged over bins of the stream."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (label, result) in enumerate(curves.items()):
        losses = result.losses / math.log(2)  # [N - 1] bits per byte
        bin_size = max(1, len(losses) // 200)
        bins = losses[: len(losses) // bin_size * bin_size].view(-1, bin_size).mean(dim=1)  # [(N - 1) / bin]
        centres = (torch.arange(len(bins)) + 0.5) * bin_size + 1
        ax.plot(centres.numpy(), bins.numpy(), color=f"C{i}", lw=0.6, alpha=0.35)
        starts = [start + 1 for start, _, _ in result.segments] + [result.segments[-1][1]]
        means = [loss / math.log(2) for _, _, loss in result.segments]
        ax.step(starts, [*means, means[-1]], where="post", color=f"C{i}", lw=2, label=f"{label} (segment mean; faint: {bin_size}-byte bins)")
    ax.set_xlabel("position in the stream (bytes)")
    ax.set_ylabel("loss (bits per byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
