"""The sequential pruning pass: block i is calibrated on the outputs of blocks 0..i-1 as already pruned.

This is how Wanda and SparseGPT prune; here every linear can have its own ratio (the allocation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .calibration import ReplayState, StatsComplete, TokenBatch, advance, collect_stats, record_inputs, run_block
from .masking import METHODS, MaskedModel, magnitude_mask, sparsegpt_prune, wanda_mask
from .models import decoder_blocks, linear_layers, weight_matrix


@dataclass
class PruneResult:
    zeros: dict[str, int] = field(default_factory=dict)
    numel: dict[str, int] = field(default_factory=dict)

    @property
    def achieved_sparsity(self) -> float:
        return sum(self.zeros.values()) / max(sum(self.numel.values()), 1)

    def per_layer(self) -> dict[str, float]:
        return {name: self.zeros[name] / self.numel[name] for name in self.numel}


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}: use one of {', '.join(METHODS)}")
    return method


@torch.no_grad()
def block_stats(block: nn.Module, modules: dict[str, nn.Module], state: ReplayState, method: str) -> dict:
    """Input statistics of the given linears from one pass of `block` on the current inputs.

    The block is run but NOT advanced: statistics of all its linears come from the block as it was
    before any of them is pruned, as in Wanda's and SparseGPT's reference pipelines.
    """
    if method == "magnitude" or not modules:
        return {}
    stats: dict = {}
    for b, hidden in enumerate(state.hidden):
        with collect_stats(modules, hessian=method == "sparsegpt", stop_when_complete=True, into=stats):
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
    weight = masked.dense[name]
    if method == "magnitude":
        keep, new = magnitude_mask(weight, ratio, pattern), None
    elif method == "wanda":
        keep, new = wanda_mask(weight, stats[name].norm, ratio, pattern), None
    else:
        keep, new = sparsegpt_prune(weight, stats[name].hessian, ratio, pattern)
    masked.apply(name, keep, new)
    return int((~keep).sum())


def prune_block(masked: MaskedModel, block: nn.Module, names: list[str], ratios: dict[str, float],
                state: ReplayState | None, method: str, pattern: str | None) -> dict[str, int]:
    """Prune the linears of one block (full names) on the block's current inputs."""
    todo = {name: masked.modules[name] for name in names if ratios.get(name, 0.0) > 0 or pattern}
    stats = block_stats(block, todo, state, method) if state is not None else {}
    return {name: prune_linear(masked, name, ratios.get(name, 0.0), method, pattern, stats) for name in names}


def calibration_batches(calibration: torch.Tensor, batch_size: int, device: torch.device | str) -> list[TokenBatch]:
    return [TokenBatch(calibration[i:i + batch_size].to(device)) for i in range(0, calibration.shape[0], batch_size)]


@torch.no_grad()
def prune_model(model: nn.Module, calibration: torch.Tensor, ratios: dict[str, float], method: str = "wanda",
                pattern: str | None = None, batch_size: int = 4, masked: MaskedModel | None = None,
                progress: bool = False) -> tuple[MaskedModel, PruneResult]:
    """Prune every linear to its ratio with one sequential pass over the calibration windows."""
    check_method(method)
    refs = linear_layers(model)
    masked = masked or MaskedModel({ref.name: ref.module for ref in refs})
    device = next(model.parameters()).device
    state = record_inputs(model, calibration_batches(calibration, batch_size, device)) if method != "magnitude" else None
    result = PruneResult(numel={ref.name: weight_matrix(ref.module).numel() for ref in refs})
    blocks = decoder_blocks(model)
    iterator = range(len(blocks))
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=f"{method} pruning", unit="block")
    for index in iterator:
        names = [ref.name for ref in refs if ref.block_index == index]
        result.zeros.update(prune_block(masked, blocks[index], names, ratios, state, method, pattern))
        if state is not None:
            advance(model, state, index + 1)
    return masked, result
