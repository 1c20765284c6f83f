"""exact: the real sequential prune and the real metrics on the evaluation slices.

Hidden states of the decided prefix are cached for the calibration, text and fact batches, so each
step runs only the block it just pruned, and the end needs only the final norm and the head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...pruning.calibration import ReplayState, advance, record_inputs
from ...context import PruningContext
from ...data.evaluation import (ChoiceScores, choice_scores, fact_batches, nll_from_hidden, summarise_facts,
                          supports_packing, window_batches)
from ...models import decoder_blocks
from ...pruning.sequential import SequentialPruner
from .base import Fidelity


@dataclass
class _State:
    states: dict[str, ReplayState]
    stats: dict  # block statistics taken before the block's first linear was pruned (mid-block checkpoints)


class ExactFidelity(Fidelity):
    name = "exact"

    def __init__(self, context: PruningContext):
        ctx = self.context = context
        device = next(ctx.model.parameters()).device
        ctx.restore()
        self._windows = window_batches(ctx.slices.evaluation.to(device), ctx.data.batch_size)
        self._facts = ctx.facts
        self._fact_batches = [batch.to(device) for batch in fact_batches(
            ctx.tokenizer, self._facts, ctx.data.fact_batch_size, packed=supports_packing(ctx.model))]
        self._initial = {"calib": record_inputs(ctx.model, ctx.calibration),
                         "text": record_inputs(ctx.model, self._windows),
                         "facts": record_inputs(ctx.model, self._fact_batches)}
        probe = ReplayState([self._initial["calib"].hidden[0].clone()], [self._initial["calib"].calls[0]])
        self._dense_outputs = []
        for index in range(len(decoder_blocks(ctx.model))):
            advance(ctx.model, probe, index + 1)
            self._dense_outputs.append(probe.hidden[0].clone())
        self.reference = ctx.dense
        self._states: dict[str, ReplayState] = {}
        self._pruner: SequentialPruner | None = None

    def reset(self) -> None:
        self.context.restore()
        self._states = {k: v.clone() for k, v in self._initial.items()}
        self._pruner = self._new_pruner({})

    def _new_pruner(self, stats: dict) -> SequentialPruner:
        ctx = self.context
        return SequentialPruner(ctx.model, ctx.masked, ctx.method, ctx.pattern, self._states["calib"], stats)

    def prune_unit(self, index: int, ratio: float) -> tuple[int, float | None]:
        units = self.context.units
        unit = units[index]
        zeros = sum(self._pruner.prune(unit.linears, ratio).values())
        block_index = unit.linears[0].block_index
        last_of_block = index == len(units) - 1 or units[index + 1].linears[0].block_index != block_index
        if not last_of_block:
            return zeros, None
        self._pruner.finish_block(block_index, (self._states["text"], self._states["facts"]))
        dense = self._dense_outputs[block_index]
        calib = self._states["calib"]
        return zeros, float((calib.hidden[0] - dense).norm() / dense.norm().clamp_min(1e-12))

    @torch.no_grad()
    def finish(self, ratios: list[float], zeros: list[int]) -> dict:
        ctx = self.context
        total, count = 0.0, 0
        for batch, hidden in zip(self._windows, self._states["text"].hidden):
            nll, n = nll_from_hidden(ctx.model, batch, hidden)
            total, count = total + nll, count + n
        scores = ChoiceScores()
        for batch, hidden in zip(self._fact_batches, self._states["facts"].hidden):
            scores.merge(choice_scores(ctx.model, batch, hidden))
        metrics = ctx.metrics(math.exp(total / count), summarise_facts(self._facts, scores))
        return {**metrics.as_dict(), "achieved_sparsity": ctx.achieved_sparsity()}

    def checkpoint(self) -> _State:
        return _State({k: v.clone() for k, v in self._states.items()}, dict(self._pruner.stats) if self._pruner else {})

    def rollback(self, state: _State, undone: list[int]) -> None:
        """The undone units' dense weights come back bit-exactly; the replay states are the checkpoint's."""
        for index in undone:
            self.context.masked.restore([ref.name for ref in self.context.units[index].linears])
        self._states = {k: v.clone() for k, v in state.states.items()}
        # not recomputed: after a mid-block rollback the block's earlier linears are already pruned
        self._pruner = self._new_pruner(state.stats)

    def close(self) -> None:
        self._initial, self._states, self._dense_outputs, self._pruner = {}, {}, [], None
        self._windows, self._fact_batches = [], []
