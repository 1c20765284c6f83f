"""The interface every fidelity implements (see the package docstring for the call order)."""

from __future__ import annotations

from ...context import Metrics


class Fidelity:
    """Prunes one unit at a time and measures the episode's end; `reference` is what the reward compares with."""

    name = "base"
    reference: Metrics

    def reset(self) -> None:
        """Back to the dense model at the start of an episode."""

    def prune_unit(self, index: int, ratio: float) -> tuple[int, float | None]:
        """Prune unit `index` to `ratio`: (weights removed, the relative error of the block's output when
        this unit ended a block (exact only), else None)."""
        raise NotImplementedError

    def finish(self, ratios: list[float], zeros: list[int]) -> dict:
        """The final metrics (ppl, fact_acc, fact_nll, fact_retention, achieved_sparsity, ...)."""
        raise NotImplementedError

    def checkpoint(self) -> object:
        """What `rollback` needs to come back to this point (beyond the env's own bookkeeping)."""
        return None

    def rollback(self, state: object, undone: list[int]) -> None:
        """Undo the units in `undone` (decided after the checkpoint `state` was taken)."""

    def close(self) -> None:
        """Release what the fidelity holds (cached activations, the fit); the context is the env's."""
