"""How a LayerPrune episode prunes its units and measures its end: one strategy object per fidelity.

`LayerPruneEnv` keeps the spaces, the action wall, the bookkeeping and the observations; a `Fidelity`
does the rest, so each of exact, proxy and surrogate reads in one sitting:

    fidelity = make_fidelity(name, context, **options)   # prepare: what the fidelity needs once
    fidelity.reset()                                     # a new episode from the dense model
    zeros, drop = fidelity.prune_unit(index, ratio)      # weights removed; the block error when a block ended
    metrics = fidelity.finish(ratios, zeros)             # ppl, fact_acc, fact_nll, fact_retention, achieved ...
    state = fidelity.checkpoint(); fidelity.rollback(state, undone)
    fidelity.close()                                     # releases what the fidelity holds
"""

from __future__ import annotations

from ..rewards import RewardConfig
from .base import Fidelity
from .exact import ExactFidelity
from .proxy import ProxyFidelity
from .surrogate import SurrogateContext, SurrogateFidelity, surrogate_context

FIDELITY_CLASSES: dict[str, type[Fidelity]] = {"exact": ExactFidelity, "proxy": ProxyFidelity,
                                               "surrogate": SurrogateFidelity}
FIDELITIES = tuple(FIDELITY_CLASSES)


def make_fidelity(name: str, context, *, proxy_eval_tokens: int, proxy_facts: int, surrogate: str | None,
                  reward: RewardConfig) -> Fidelity:
    """The fidelity `name` prepared on `context` (a PruningContext; a SurrogateContext for the surrogate)."""
    if name == "exact":
        return ExactFidelity(context)
    if name == "proxy":
        return ProxyFidelity(context, proxy_eval_tokens, proxy_facts)
    return SurrogateFidelity(context, surrogate, reward)


__all__ = ["FIDELITIES", "Fidelity", "ExactFidelity", "ProxyFidelity", "SurrogateFidelity", "SurrogateContext",
           "make_fidelity", "surrogate_context"]
