"""Layer-sensitivity profile of arXiv 2601.09694, computed once per model + calibration, cached on disk.

Per linear layer: the dense-model activation norms ||X_j||_2 (Wanda's statistic), the mean absolute
loss gradient |dL/dW| over M calibration samples, and from these the unit scores:
  s_u = 10th percentile of the non-zero Wanda scores |W| * ||X||_2 of the unit's weights
  g_u = mean of |dL/dW| over the unit's weights (averaged over the M samples)
each z-scored across units, (x - mean) / (std + eps), so profiles compare across models.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..files import atomic_path, cache_root, read_cache
from ..models import LinearRef, weight_matrix
from .calibration import TokenBatch, advance, collect_stats, record_inputs
from .masking import wanda_scores

EPS = 1e-8
PERCENTILE = 0.10


@dataclass
class LinearStats:
    """Per-linear raw statistics: everything the profile and the heuristics need."""

    act_norm: dict[str, torch.Tensor]  # name -> ||X_j||_2 per input feature (dense model)
    grad_mean: dict[str, float]  # name -> mean |dL/dW|

    def to_dict(self) -> dict:
        return {"act_norm": self.act_norm, "grad_mean": self.grad_mean}


def cache_dir() -> Path:
    """<cache>/prune-gym/profiles: profiles, dense metrics and alphas, keyed by `cache_key`."""
    return cache_root() / "profiles"


def cache_key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


@torch.no_grad()
def _activation_norms(model: nn.Module, refs: list[LinearRef], batches: list[TokenBatch]) -> dict[str, torch.Tensor]:
    state = record_inputs(model, batches)
    with collect_stats({ref.name: ref.module for ref in refs}) as stats:
        advance(model, state)
    return {name: entry.norm.cpu() for name, entry in stats.items()}


def _gradient_means(model: nn.Module, refs: list[LinearRef], batches: list[TokenBatch]) -> dict[str, float]:
    """Mean over samples of |dL_i/dW|, reduced to one scalar per linear (one backward per sample).

    The mean over weights and the mean over samples commute, so each gradient is reduced to its scalar
    the moment backward has accumulated it and then dropped: at most a few gradients exist at once,
    never a model-sized set of them.
    """
    params = {ref.name: ref.module.weight for ref in refs}
    flags = {p: p.requires_grad for p in model.parameters()}
    held = {p: p.grad for p in params.values()}  # the caller's gradients, put back afterwards
    sums = dict.fromkeys(params, 0.0)

    def reducer(name: str):
        def hook(param: torch.Tensor) -> None:
            sums[name] += float(param.grad.detach().abs().float().mean())
            param.grad = None
        return hook

    for p in model.parameters():
        p.requires_grad_(False)
    handles = []
    for name, p in params.items():
        p.requires_grad_(True)
        p.grad = None
        handles.append(p.register_post_accumulate_grad_hook(reducer(name)))
    samples = 0
    try:
        for batch in batches:
            for row in batch.input_ids:
                ids = row[None]
                model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
                samples += 1
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for p, grad in held.items():
            p.grad = grad
    return {name: total / max(samples, 1) for name, total in sums.items()}


def _load_stats(path: Path) -> LinearStats:
    data = torch.load(path, weights_only=True)
    return LinearStats(act_norm=data["act_norm"], grad_mean=data["grad_mean"])


def compute_linear_stats(model: nn.Module, refs: list[LinearRef], calibration: list[TokenBatch],
                         gradient: list[TokenBatch], cache_key_: str | None = None) -> LinearStats:
    """Activation norms and gradient means, from the disk cache when the same key was computed before."""
    path = cache_dir() / f"{cache_key_}.pt" if cache_key_ else None
    cached = read_cache(path, _load_stats) if path is not None else None
    if cached is not None:
        return cached
    stats = LinearStats(act_norm=_activation_norms(model, refs, calibration),
                        grad_mean=_gradient_means(model, refs, gradient))
    if path is not None:
        with atomic_path(path) as tmp:
            torch.save(stats.to_dict(), tmp)
    return stats


def zscore(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    std = t.std(unbiased=False) if len(values) > 1 else torch.tensor(0.0, dtype=torch.float64)
    return ((t - t.mean()) / (std + EPS)).tolist()


def nonzero_percentile(scores: torch.Tensor, q: float = PERCENTILE) -> float:
    """q-quantile of the non-zero entries (lower order statistic); 0 when everything is pruned."""
    flat = scores.reshape(-1)
    flat = flat[flat != 0]
    if flat.numel() == 0:
        return 0.0
    k = max(1, int(q * (flat.numel() - 1)) + 1)
    return float(flat.kthvalue(k).values)


def unit_wanda_percentile(refs: list[LinearRef], act_norm: dict[str, torch.Tensor]) -> float:
    """s_u over the unit's current (live) weights: pruned weights are zero and are skipped."""
    scores = torch.cat([wanda_scores(weight_matrix(ref.module), act_norm[ref.name]).reshape(-1) for ref in refs])
    return nonzero_percentile(scores)


def unit_gradient(refs: list[LinearRef], grad_mean: dict[str, float]) -> float:
    numel = sum(ref.numel for ref in refs)
    return sum(grad_mean[ref.name] * ref.numel for ref in refs) / numel
