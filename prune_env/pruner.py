"""The sequential pruning pass: block i is calibrated on the outputs of blocks 0..i-1 as already pruned.

This is how Wanda and SparseGPT prune; here every linear can have its own ratio (the allocation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .calibration import ReplayState, TokenBatch, advance, collect_stats, record_inputs, run_block
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
def prune_block(masked: MaskedModel, block: nn.Module, names: dict[str, str], ratios: dict[str, float],
                state: ReplayState | None, method: str, pattern: str | None) -> dict[str, int]:
    """Prune the linears of one block (names: full name -> name relative to the block).

    Statistics are collected in one pass of the block on the current (pruned-prefix) inputs, as Wanda
    does; the block is then NOT advanced: the caller decides when to run it.
    """
    todo = {full: masked.modules[full] for full in names if ratios.get(full, 0.0) > 0 or pattern}
    stats = {}
    if method != "magnitude" and todo:
        with collect_stats(todo, hessian=method == "sparsegpt") as stats:
            for b, hidden in enumerate(state.hidden):
                run_block(block, hidden, state.calls[b][state.next_block])
    zeros = {}
    for full in names:
        ratio = ratios.get(full, 0.0)
        if full not in todo:
            masked.restore([full])
            zeros[full] = 0
            continue
        weight = masked.dense[full]
        if method == "magnitude":
            keep, new = magnitude_mask(weight, ratio, pattern), None
        elif method == "wanda":
            keep, new = wanda_mask(weight, stats[full].norm, ratio, pattern), None
        else:
            keep, new = sparsegpt_prune(weight, stats[full].hessian, ratio, pattern)
        masked.apply(full, keep, new)
        zeros[full] = int((~keep).sum())
    return zeros


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
        names = {ref.name: ref.kind for ref in refs if ref.block_index == index}
        result.zeros.update(prune_block(masked, blocks[index], names, ratios, state, method, pattern))
        if state is not None:
            advance(model, state, index + 1)
    return masked, result
