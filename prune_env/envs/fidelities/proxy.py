"""proxy: masks from precomputed dense-calibration score ranks (no sequential recalibration), metrics on
the first `proxy_eval_tokens` tokens and `proxy_facts` facts of the same slices. Much cheaper than exact."""

from __future__ import annotations

from ...context import PruningContext
from ...pruning.snapshot import RankedMasks
from .base import Fidelity


class ProxyFidelity(Fidelity):
    name = "proxy"

    def __init__(self, context: PruningContext, proxy_eval_tokens: int, proxy_facts: int):
        ctx = self.context = context
        device = next(ctx.model.parameters()).device
        ctx.restore()
        n_windows = max(1, proxy_eval_tokens // ctx.data.eval_seq_len)
        self._windows = ctx.slices.evaluation[:n_windows].to(device)
        self._facts = ctx.facts[:proxy_facts]
        self._ranks = RankedMasks(ctx.masked.dense, ctx.method, ctx.stats.act_norm)
        self.reference = ctx.evaluate(dense_exact=None, windows=self._windows, facts=self._facts)

    def reset(self) -> None:
        self.context.restore()

    def prune_unit(self, index: int, ratio: float) -> tuple[int, None]:
        ctx = self.context
        return sum(self._ranks.apply(ctx.masked, ref.name, ratio) for ref in ctx.units[index].linears), None

    def finish(self, ratios: list[float], zeros: list[int]) -> dict:
        ctx = self.context
        metrics = ctx.evaluate(self.reference.greedy_exact, windows=self._windows, facts=self._facts)
        return {**metrics.as_dict(), "achieved_sparsity": ctx.achieved_sparsity()}

    def rollback(self, state: None, undone: list[int]) -> None:
        for index in undone:
            self.context.masked.restore([ref.name for ref in self.context.units[index].linears])

    def close(self) -> None:
        self._ranks = None
