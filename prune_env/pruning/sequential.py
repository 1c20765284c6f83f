"""The sequential pruning pass: block i is calibrated on the outputs of blocks 0..i-1 as already pruned.

This is how Wanda and SparseGPT prune; here every linear can have its own ratio (the allocation).
`SequentialPruner` is the one block walk of the package: `prune_model` drives it over a whole model,
LayerPrune-v0 drives it one decision unit per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..models import LinearRef, decoder_blocks, linear_layers, weight_matrix
from .calibration import ReplayState, StatsComplete, TokenBatch, advance, collect_stats, record_inputs, run_block
from .methods import check_method, get_method
from .snapshot import MaskedModel

__all__ = ["PruneResult", "SequentialPruner", "block_stats", "calibration_batches", "check_method", "prune_linear",
           "prune_model"]


@dataclass
class PruneResult:
    zeros: dict[str, int] = field(default_factory=dict)
    numel: dict[str, int] = field(default_factory=dict)

    @property
    def achieved_sparsity(self) -> float:
        return sum(self.zeros.values()) / max(sum(self.numel.values()), 1)

    def per_layer(self) -> dict[str, float]:
        return {name: self.zeros[name] / self.numel[name] for name in self.numel}


@torch.no_grad()
def block_stats(block: nn.Module, modules: dict[str, nn.Module], state: ReplayState, method: str) -> dict:
    """Input statistics of the given linears from one pass of `block` on the current inputs.

    The block is run but NOT advanced: statistics of all its linears come from the block as it was
    before any of them is pruned, as in Wanda's and SparseGPT's reference pipelines.
    """
    statistics = get_method(method).statistics
    if statistics == "none" or not modules:
        return {}
    stats: dict = {}
    for b, hidden in enumerate(state.hidden):
        with collect_stats(modules, hessian=statistics == "hessian", stop_when_complete=True, into=stats):
            try:
                run_block(block, hidden, state.calls[b][state.next_block])
            except StatsComplete:
                pass
    return stats


def prune_linear(masked: MaskedModel, name: str, ratio: float, method: str, pattern: str | None,
                 stats: dict) -> int:
    """Prune one linear from its dense weights to `ratio`; returns how many weights were removed."""
    if ratio <= 0 and not pattern:
        masked.restore([name])
        return 0
    keep, new = get_method(method).select(masked.dense[name], stats.get(name), ratio, pattern)
    masked.apply(name, keep, new)
    return masked.zeros(name)


def calibration_batches(calibration: torch.Tensor, batch_size: int, device: torch.device | str) -> list[TokenBatch]:
    return [TokenBatch(calibration[i:i + batch_size].to(device)) for i in range(0, calibration.shape[0], batch_size)]


class SequentialPruner:
    """Walks a model's blocks in order: prune linears of the current block, then `finish_block` runs it.

    Statistics of a block are taken once, on its calibration inputs, before its first linear is pruned
    (so every linear of a block sees the block as it was); `finish_block` advances the calibration
    replay (and any other replay states the caller follows, e.g. evaluation windows) through the
    block as pruned. `calib` is None for methods that need no statistics.
    """

    def __init__(self, model: nn.Module, masked: MaskedModel, method: str, pattern: str | None,
                 calib: ReplayState | None, stats: dict[int, dict] | None = None):
        self.model, self.masked = model, masked
        self.method, self.pattern = check_method(method), pattern
        self.calib = calib
        self.stats: dict[int, dict] = dict(stats or {})  # block index -> statistics of its linears
        self._blocks = decoder_blocks(model)

    def prune(self, refs: list[LinearRef], ratio: float) -> dict[str, int]:
        """Prune these linears (all of one block, in model order) to `ratio`; zeros per linear."""
        return {ref.name: self._prune_one(ref, ratio) for ref in refs}

    def _prune_one(self, ref: LinearRef, ratio: float) -> int:
        needs_stats = (ratio > 0 or self.pattern) and get_method(self.method).statistics != "none"
        if needs_stats and ref.block_index not in self.stats:
            if self.calib is None:
                raise ValueError(f"method {self.method!r} needs calibration statistics: pass calib")
            index = ref.block_index
            modules = {r.name: r.module for r in linear_layers(self.model) if r.block_index == index}
            self.stats = {index: block_stats(self._blocks[index], modules, self.calib, self.method)}
        return prune_linear(self.masked, ref.name, ratio, self.method, self.pattern,
                            self.stats.get(ref.block_index, {}))

    @torch.no_grad()
    def finish_block(self, index: int, others: tuple[ReplayState, ...] = ()) -> None:
        """Run block `index` (as pruned now) on the calibration replay and the given states."""
        for state in (self.calib, *others):
            if state is not None:
                advance(self.model, state, index + 1)


@torch.no_grad()
def prune_model(model: nn.Module, calibration: torch.Tensor, ratios: dict[str, float], method: str = "wanda",
                pattern: str | None = None, batch_size: int = 4, masked: MaskedModel | None = None,
                progress: bool = False) -> tuple[MaskedModel, PruneResult]:
    """Prune every linear to its ratio with one sequential pass over the calibration windows.

    Block by block (SparseGPT order): each block's statistics are taken on the outputs of the blocks
    already pruned, so a later layer is calibrated on what it will really see.

    Args:
        model: a causal LM (`prune_env.models.load_model`); pruned in place.
        calibration: token windows, int64 [n, seq_len] (`PruningContext.slices.calibration`).
        ratios: the sparsity of each linear by its full name (`linear_layers(model)[i].name`), in [0, 1);
            a linear not named keeps its weights.
        method: a registered pruning method: "magnitude", "wanda", "sparsegpt" or one of `register_method`.
        pattern: an N:M pattern ("2:4"), which fixes every ratio at N/M; None for unstructured.
        batch_size: calibration windows per forward pass.
        masked: an existing `MaskedModel` of `model` to prune into (its dense snapshot is kept); None
            makes one.
        progress: print one line per block.

    Returns:
        The `MaskedModel` (restore() brings the dense weights back) and a `PruneResult` (zeros and numel
        per linear, `achieved_sparsity`).
    """
    check_method(method)
    refs = linear_layers(model)
    masked = masked or MaskedModel({ref.name: ref.module for ref in refs})
    device = next(model.parameters()).device
    needs_calib = get_method(method).statistics != "none"
    calib = record_inputs(model, calibration_batches(calibration, batch_size, device)) if needs_calib else None
    pruner = SequentialPruner(model, masked, method, pattern, calib)
    result = PruneResult(numel={ref.name: weight_matrix(ref.module).numel() for ref in refs})
    iterator = range(len(decoder_blocks(model)))
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=f"{method} pruning", unit="block")
    for index in iterator:
        for ref in (r for r in refs if r.block_index == index):
            result.zeros.update(pruner.prune([ref], ratios.get(ref.name, 0.0)))
        pruner.finish_block(index)
    return masked, result
