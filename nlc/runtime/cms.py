"""`cms`: the Continuum Memory System (LANGUAGE.md §3.6, §4 last paragraph).

Each level is a network memory with one head of width dim, written once per chunk of `every` tokens,
with stop-gradient writes and differentiable reads; its initial weights are outer parameters.

objective = task: the level's weights are fast weights `W = W0 + delta`, delta detached. A forward call
reads `W0 + delta` for all its tokens (it never writes: it cannot know the loss yet) and keeps, in a
`TaskRead`, each weight's input per token; the backward leaves there the loss gradient at each weight's
product, so that a piece's `dL/dW` (a piece: the call's tokens inside one chunk) is a sum of per-token
outer products over its tokens. `layer.learn(state)` folds those gradients into the chunk's accumulator
and writes every chunk completed since the last `learn`.

objective = l2: the level learns in the forward pass through `memory_update` (`every = C`, grad = stop):
key = the level's input at the previous token, value = its input at this token, query = its input at
this token, so that the level learns to predict its next input (README.md explains why not the literal
"next level's input").
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from nlc.ops.cms.dispatch import chunk_update
from nlc.ops.memory.dispatch import flush as flush_memory
from nlc.ops.memory.dispatch import memory_update
from nlc.ops.memory.rule import Gates, MemoryState, Rule
from nlc.ops.memory.structure import apply_structure
from nlc.runtime.config import CmsConfig, CmsLevelConfig
from nlc.runtime.memory import MemoryCore, compute_dtype, expand_batch


@dataclass
class CmsLevelState:
    """One level's in-context state.

    memory:   l2: the level's memory state (weights [B, 1, out, in], pending chunk, momentum, position)
    delta:    task: W - W0, detached, [B, 1, out, in] per weight
    momentum: task with momentum: S per weight
    pending:  task: the summed dL/dW of the current, unfinished chunk
    reads:    task: the TaskRead of every forward call since the last learn
    prev:     l2: the level's input at the previous token [B, dim] (the key of the next token)
    """

    memory: MemoryState | None = None
    delta: tuple[Tensor, ...] | None = None
    momentum: tuple[Tensor, ...] | None = None
    pending: tuple[Tensor, ...] | None = None
    reads: list[TaskRead] = field(default_factory=list)
    prev: Tensor | None = None


@dataclass
class CmsState:
    levels: list[CmsLevelState]
    pos: int = 0  # tokens seen; chunks are counted from the start of the stream


def level_rule(level: CmsLevelConfig, objective: str) -> Rule:
    return Rule(structure=level.structure, objective=objective, update=level.update, every=max(level.every, 1), grad="stop")


class TaskRead:
    """One forward call's read of an `objective = task` level: each weight's input h and, once a backward has run,
    the loss gradient at its product z = h W^T, per token. A piece's dL/dW is then sum_t dL/dz_t h_t^T over its
    tokens, which is what a leaf W of its own would have received."""

    def __init__(self, pieces: list[tuple[int, int, int]]):
        self.pieces = pieces  # (first token, token after the last, in the call; stream position after the piece)
        self.inputs: dict[int, Tensor] = {}  # weight index -> h [B, 1, t, in]
        self.grads: dict[int, Tensor] = {}  # weight index -> dL/dz [B, 1, t, out], summed over backwards

    def watch(self, i: int, h: Tensor, z: Tensor) -> None:
        self.inputs[i] = h.detach()
        if z.requires_grad:
            z.register_hook(lambda g: self._add(i, g))

    def _add(self, i: int, g: Tensor) -> None:
        self.grads[i] = g if i not in self.grads else self.grads[i] + g

    def gradients(self, like: tuple[Tensor, ...]) -> list[tuple[tuple[Tensor, ...], int]]:
        """(dL/dW per weight `[B, 1, out, in]`, stream position after the piece) for each piece, in order; zeros
        for a weight the loss did not reach. `like`: tensors of the weights' shapes."""
        out = []
        for s, e, end in self.pieces:
            grads = tuple(self.grads[i][:, :, s:e].mT @ self.inputs[i][:, :, s:e] if i in self.grads else torch.zeros_like(w) for i, w in enumerate(like))
            out.append((grads, end))
        return out


def chunk_pieces(pos: int, T: int, every: int) -> list[tuple[int, int]]:
    """Cut [0, T) at the chunk boundaries of a stream that has seen `pos` tokens."""
    cuts = [0]
    while cuts[-1] < T:
        cuts.append(min(T, ((pos + cuts[-1]) // every + 1) * every - pos))
    return list(itertools.pairwise(cuts))


class CmsLayer(nn.Module):
    def __init__(self, cfg: CmsConfig):
        super().__init__()
        if not cfg.levels:
            raise ValueError("a cms needs at least one level")
        for level in cfg.levels:
            if level.structure.kind != "mlp":
                raise ValueError(f"cms level {level.name!r} must have an mlp structure")
            if level.every < 0:
                raise ValueError(f"cms level {level.name!r}: every must be >= 0")
        if cfg.variant == "nested":
            for fast, slow in zip(cfg.levels, cfg.levels[1:]):
                if fast.structure != slow.structure:
                    raise ValueError("nested cms levels must share one structure: a level is re-set from the next")
                if slow.every and (not fast.every or slow.every % fast.every):
                    raise ValueError(f"nested cms: level {slow.name!r}'s chunk must be a multiple of {fast.name!r}'s")
        self.cfg = cfg
        self.rules = [level_rule(level, cfg.objective) for level in cfg.levels]
        self.cores = nn.ModuleList(MemoryCore(rule, 1, cfg.dim, cfg.dim, "learned", residual_out=cfg.variant != "independent") for rule in self.rules)
        self.mix = nn.Parameter(torch.zeros(len(cfg.levels))) if cfg.variant == "independent" else None

    def initial_state(self, batch_size: int, device=None, dtype: torch.dtype = torch.float32) -> CmsState:
        cdtype = compute_dtype(dtype)
        levels = []
        for level, core in zip(self.cfg.levels, self.cores):
            if self.cfg.objective == "l2":
                levels.append(
                    CmsLevelState(
                        memory=core.initial_state(batch_size, device, cdtype),
                        prev=torch.zeros(batch_size, self.cfg.dim, device=device, dtype=cdtype),
                    )
                )
            else:
                delta = tuple(torch.zeros(batch_size, *w.shape, device=device, dtype=cdtype) for w in core.init_weights)
                momentum = tuple(torch.zeros_like(d) for d in delta) if level.update == "momentum" else None
                levels.append(CmsLevelState(delta=delta, momentum=momentum))
        return CmsState(levels=levels)

    def _weights0(self, index: int, batch_size: int, dtype: torch.dtype) -> tuple[Tensor, ...]:
        return tuple(expand_batch(w, batch_size, dtype) for w in self.cores[index].init_weights)  # [B, 1, out, in]

    def _level(self, index: int, h: Tensor, levels: list[CmsLevelState], pos: int) -> Tensor:
        """Level `index` on its input h `[B, t, dim]` at stream position pos -> its read `[B, t, dim]`."""
        level, rule, st = self.cfg.levels[index], self.rules[index], levels[index]
        B, t, _ = h.shape
        cdtype = compute_dtype(h.dtype)
        hh = h.to(cdtype)[:, None]  # [B, 1, t, dim]
        W0 = self._weights0(index, B, cdtype)
        if level.every == 0:
            return apply_structure(rule.structure, W0, hh)[:, 0].to(h.dtype)
        if self.cfg.objective == "l2":
            keys = torch.cat([st.prev[:, None], h.to(cdtype)[:, :-1]], dim=1)[:, None]  # [B, 1, t, dim]: one token earlier
            lr = torch.full((B, 1, t), level.lr, device=h.device, dtype=cdtype)
            beta = torch.full_like(lr, level.beta) if level.update == "momentum" else None
            o, memory = memory_update(hh, keys, hh, Gates(lr=lr, beta=beta), rule, st.memory)  # [B, 1, t, dim]
            levels[index] = CmsLevelState(memory=memory, prev=h.to(cdtype)[:, -1])
            return o[:, 0].to(h.dtype)
        # every piece of the call reads the same W = W0 + delta (writes wait for `learn`): one forward for all
        # of them, whose per-token gradients at the pre-activations give each piece's dL/dW in `learn`
        W = tuple(w0 + d for w0, d in zip(W0, st.delta))  # [B, 1, out, in]
        if not torch.is_grad_enabled():
            return apply_structure(rule.structure, W, hh)[:, 0].to(h.dtype)
        # with the outer parameters frozen (evaluation) the level still learns: its weights need a graph
        W = tuple(w if w.requires_grad else w.requires_grad_() for w in W)
        read = TaskRead([(s, e, pos + e) for s, e in chunk_pieces(pos, t, level.every)])
        out = apply_structure(rule.structure, W, hh, on_preactivation=read.watch)  # [B, 1, t, dim]
        levels[index] = CmsLevelState(delta=st.delta, momentum=st.momentum, pending=st.pending, reads=[*st.reads, read])
        return out[:, 0].to(h.dtype)

    def _nested_reset(self, levels: list[CmsLevelState], i: int) -> None:
        """Re-set level i's weights to level i + 1's (the end of a chunk of level i + 1); momentum restarts."""
        fast, slow = levels[i], levels[i + 1]
        if self.cfg.objective == "l2":
            momentum = None if fast.memory.momentum is None else tuple(torch.zeros_like(m) for m in fast.memory.momentum)
            memory = fast.memory.replace(weights=slow.memory.weights, momentum=momentum, pending=None, last={})
            levels[i] = CmsLevelState(memory=memory, prev=fast.prev)
            return
        B, dtype = fast.delta[0].shape[0], fast.delta[0].dtype
        W_slow, W_fast = self._weights0(i + 1, B, dtype), self._weights0(i, B, dtype)
        delta = tuple((ws + ds - wf).detach() for ws, ds, wf in zip(W_slow, slow.delta, W_fast))  # W_i := W_{i+1}
        momentum = None if fast.momentum is None else tuple(torch.zeros_like(m) for m in fast.momentum)
        levels[i] = CmsLevelState(delta=delta, momentum=momentum, pending=fast.pending, reads=fast.reads)

    def forward(self, x: Tensor, state: CmsState | None = None) -> tuple[Tensor, CmsState]:
        B, T, _ = x.shape
        if state is None:
            state = self.initial_state(B, x.device, x.dtype)
        if T == 0:
            return torch.zeros_like(x), state
        levels = list(state.levels)
        if self.cfg.variant == "independent":
            weights = torch.softmax(self.mix, dim=0)  # [L]
            y = sum(w * self._level(i, x, levels, state.pos) for i, w in enumerate(weights))
            return y, CmsState(levels=levels, pos=state.pos + T)
        # nested with l2 writes inside the forward: cut at the slower levels' chunk ends to re-set there
        pieces = [(0, T)]
        if self.cfg.variant == "nested" and self.cfg.objective == "l2":
            slow = [level.every for level in self.cfg.levels[1:] if level.every]
            pieces = chunk_pieces(state.pos, T, min(slow)) if slow else pieces
        ys = []
        for s, e in pieces:
            h = x[:, s:e]
            for i in range(len(levels)):
                h = h + self._level(i, h, levels, state.pos + s)  # [B, e - s, dim]
            ys.append(h)
            if self.cfg.variant == "nested" and self.cfg.objective == "l2":
                for i, slower in enumerate(self.cfg.levels[1:]):
                    if slower.every and (state.pos + e) % slower.every == 0:
                        self._nested_reset(levels, i)  # fastest first
        return torch.cat(ys, dim=1), CmsState(levels=levels, pos=state.pos + T)

    @torch.no_grad()
    def learn(self, state: CmsState, flush: bool = False) -> CmsState:
        """objective = task: fold the gradients the last backward left in each level's TaskReads into its
        chunk accumulator and write every completed chunk (with flush, the unfinished one too) with the
        level's update rule. Call after `loss.backward()`."""
        if self.cfg.objective != "task":
            return state
        levels = list(state.levels)
        wrote = [False] * len(levels)
        for i, (level, st) in enumerate(zip(self.cfg.levels, levels)):
            if level.every == 0:
                continue
            delta, momentum, pending = st.delta, st.momentum, st.pending
            pieces = []  # the gradients of the reads of the current chunk not yet folded
            for grads, end in (piece for read in st.reads for piece in read.gradients(delta)):
                pieces.append(grads)
                if end % level.every == 0:
                    delta, momentum, pending = chunk_update(delta, momentum, pending, pieces, level.lr, level.beta, write_chunk=True)
                    pieces, wrote[i] = [], True
            if pieces or flush:
                delta, momentum, pending = chunk_update(delta, momentum, pending, pieces, level.lr, level.beta, write_chunk=flush)
            levels[i] = CmsLevelState(delta=delta, momentum=momentum, pending=pending)
        if self.cfg.variant == "nested":
            for i in range(len(levels) - 1):
                if wrote[i + 1]:
                    self._nested_reset(levels, i)  # fastest first
        return CmsState(levels=levels, pos=state.pos)

    def flush(self, state: CmsState) -> CmsState:
        """Write every pending chunk now (end of a document). With objective = task, call it after the
        backward of the last piece."""
        if self.cfg.objective == "task":
            return self.learn(state, flush=True)
        levels = [st if st.memory is None else CmsLevelState(memory=flush_memory(rule, st.memory), prev=st.prev) for rule, st in zip(self.rules, state.levels)]
        return CmsState(levels=levels, pos=state.pos)
