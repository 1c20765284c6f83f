"""Fixed allocation rules as agents: uniform, OWL, AlphaPruning, random, z-score greedy.

Each agent reads what it needs from a `PruningContext` (the *dense* weights `ctx.masked.dense`, the
dense calibration activation norms `ctx.stats.act_norm`, the profile `ctx.z_wanda` / `ctx.z_grad`,
the units and their sizes) and returns one ratio per unit through the pure rules of
agents/rules.py, so every allocation meets the parameter-weighted target exactly.

Units: OWL and AlphaPruning are defined per decoder block / per linear layer. With block granularity
a unit is a block. With linear granularity OWL gives every linear its block's ratio (OWL is a
block-wise rule), and AlphaPruning gives every linear its own ratio (the reference's per-layer mode).
"""

from __future__ import annotations

import json

import numpy as np
import torch

from agents.rules import (
    match_budget,
    owl_outlier_ratio,
    owl_ratios_from_lod,
    random_ratios,
    uniform_ratios,
    zscore_greedy_ratios,
)
from agents.alphapruning import alphapruning_ratios, hill_alpha
from agents.base import Agent

__all__ = ["AlphaPruningAgent", "OWLAgent", "ProtectFirstAgent", "RampAgent", "RandomAgent", "UniformAgent",
           "ZScoreGreedyAgent",
           "block_lod", "linear_alphas"]


def _numel(ctx) -> list[int]:
    return [unit.numel for unit in ctx.units]


class UniformAgent(Agent):
    """Every unit at the target (the Wanda / SparseGPT default)."""

    name = "uniform"
    deterministic = True

    def allocate(self, ctx, target: float, seed: int = 0) -> list[float]:
        return uniform_ratios(len(ctx.units), target)


# --------------------------------------------------------------------------- OWL


@torch.no_grad()
def block_lod(ctx, m: float = 5.0) -> tuple[list[int], list[float], list[int]]:
    """(block indices, LOD per block, parameters per block): the share of each block's Wanda scores
    |W| * ||X||_2 (dense weights, dense calibration norms, all its linears concatenated) above m times
    their mean. One block at a time, so only one block's scores are ever in memory."""
    from prune_env.pruning.masking import wanda_scores

    blocks: dict[int, list] = {}
    for ref in ctx.refs:
        blocks.setdefault(ref.block_index, []).append(ref)
    order = sorted(blocks)
    lod, sizes = [], []
    for b in order:
        scores = torch.cat([wanda_scores(ctx.masked.dense[ref.name], ctx.stats.act_norm[ref.name]).reshape(-1)
                            for ref in blocks[b]])
        lod.append(owl_outlier_ratio(scores, m))
        sizes.append(sum(ref.numel for ref in blocks[b]))
        del scores
    return order, lod, sizes


class OWLAgent(Agent):
    """OWL (Yin et al., ICML 2024): blocks with more Wanda-score outliers (> m x mean) are pruned less;
    per-block sparsities span target +- lam around the target (see `owl_ratios_from_lod`)."""

    name = "owl"
    deterministic = True

    def __init__(self, lam: float = 0.08, m: float = 5.0):
        super().__init__()
        if not (isinstance(lam, (int, float)) and 0.0 <= lam < 0.5):
            raise ValueError(f"owl lam must be a number in [0, 0.5), got {lam!r}")
        if not (isinstance(m, (int, float)) and m > 0):
            raise ValueError(f"owl m must be a positive number, got {m!r}")
        self.lam, self.m = float(lam), float(m)
        self._lod: dict = {}

    def block_ratios(self, ctx, target: float) -> dict[int, float]:
        key = (ctx.spec, ctx.dtype, json.dumps(ctx.slices.describe(), sort_keys=True, default=str), self.m)
        if key not in self._lod:
            self._lod = {key: block_lod(ctx, self.m)}  # one context at a time: drop older entries
        order, lod, sizes = self._lod[key]
        ratios = owl_ratios_from_lod(lod, target, self.lam, sizes)
        return dict(zip(order, ratios))

    def allocate(self, ctx, target: float, seed: int = 0) -> list[float]:
        per_block = self.block_ratios(ctx, target)
        return [per_block[unit.linears[0].block_index] for unit in ctx.units]


# --------------------------------------------------------------------------- AlphaPruning

_ALPHA_MEMORY: dict[str, list[float]] = {}


def _alpha_key(ctx, bins: int, xmin_window: str) -> str:
    """Model identity for the alpha cache: spec, dtype, the linear names and a cheap weight fingerprint
    (sum and sum of squares of every dense matrix), so a different checkpoint never hits the cache."""
    from prune_env.pruning.scoring import cache_key

    prints = []
    for ref in ctx.refs:
        w = ctx.masked.dense[ref.name].detach().double()
        prints.append((ref.name, round(float(w.sum()), 6), round(float(w.square().sum()), 6)))
    return cache_key(kind="hill-alpha-svd32", model=ctx.spec, dtype=ctx.dtype, bins=bins, xmin_window=xmin_window,
                     weights=prints)


def linear_alphas(ctx, bins: int = 100, xmin_window: str = "reference", cache: bool = True) -> list[float]:
    """`hill_alpha` of every prunable linear's dense weight, in `ctx.refs` order.

    SVDs are the slow part, so results are cached in memory and, with `cache`, on disk as
    <cache>/prune-gym/profiles/alphas-<key>.json (written atomically)."""
    from prune_env.files import atomic_write_text
    from prune_env.pruning.scoring import cache_dir

    key = _alpha_key(ctx, bins, xmin_window)
    if key in _ALPHA_MEMORY:
        return list(_ALPHA_MEMORY[key])
    path = cache_dir() / f"alphas-{key}.json"
    if cache and path.exists():
        try:
            data = json.loads(path.read_text())
            if data.get("names") == [ref.name for ref in ctx.refs]:
                _ALPHA_MEMORY[key] = [float(a) for a in data["alphas"]]
                return list(_ALPHA_MEMORY[key])
        except (ValueError, KeyError, TypeError):
            pass  # a corrupt cache file is recomputed and overwritten
    alphas = [hill_alpha(ctx.masked.dense[ref.name], bins, xmin_window=xmin_window) for ref in ctx.refs]
    _ALPHA_MEMORY[key] = alphas
    if cache:
        atomic_write_text(path, json.dumps({"names": [ref.name for ref in ctx.refs], "alphas": alphas,
                                            "model": ctx.spec, "bins": bins, "xmin_window": xmin_window}))
    return list(alphas)


class AlphaPruningAgent(Agent):
    """AlphaPruning (Lu et al., NeurIPS 2024): a heavier-tailed weight spectrum (smaller Hill alpha) means
    a better-trained layer, pruned less. Ratios = (1 - eps + 2 eps * normalised alpha) x a scaler that
    meets the budget. Block units use the mean alpha of their linears (the reference's block-wise mode)."""

    name = "alphapruning"
    deterministic = True

    def __init__(self, eps: float = 0.3, bins: int = 100, xmin_window: str = "reference", cache: bool = True):
        super().__init__()
        if not (isinstance(eps, (int, float)) and 0.0 <= eps <= 1.0):
            raise ValueError(f"alphapruning eps must be in [0, 1], got {eps!r}")
        if xmin_window not in ("reference", "intended"):
            raise ValueError(f"alphapruning xmin_window must be 'reference' or 'intended', got {xmin_window!r}")
        if not (isinstance(bins, int) and bins >= 1):
            raise ValueError(f"alphapruning bins must be a positive integer, got {bins!r}")
        self.eps, self.bins, self.xmin_window, self.cache = float(eps), bins, xmin_window, bool(cache)

    def allocate(self, ctx, target: float, seed: int = 0) -> list[float]:
        alphas = linear_alphas(ctx, self.bins, self.xmin_window, self.cache)
        unit_of = {ref.name: u for u, unit in enumerate(ctx.units) for ref in unit.linears}
        return alphapruning_ratios(alphas, [ref.numel for ref in ctx.refs], target, self.eps,
                                   unit_of_layer=[unit_of[ref.name] for ref in ctx.refs])


# --------------------------------------------------------------------------- random, z-score


class RandomAgent(Agent):
    """Seeded random control: Dirichlet shares scaled to the target, clipped to [low, high], budget-matched.

    The generator is `np.random.default_rng(np.random.SeedSequence([self.seed, seed]))`: the agent's own
    seed (constructor) and the benchmark seed (allocate) both matter."""

    name = "random"
    deterministic = False

    def __init__(self, seed: int = 0, low: float = 0.0, high: float = 0.95):
        super().__init__()
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"random seed must be a non-negative integer, got {seed!r}")
        if not 0.0 <= low < high < 1.0:
            raise ValueError(f"random needs 0 <= low < high < 1, got low={low!r} high={high!r}")
        self.seed, self.low, self.high = seed, float(low), float(high)

    def allocate(self, ctx, target: float, seed: int = 0) -> list[float]:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, int(seed)]))
        return random_ratios(_numel(ctx), target, rng, self.low, self.high)


class ZScoreGreedyAgent(Agent):
    """The paper's sensitivity profile used by a fixed rule: ratio = target - spread * (z_wanda + z_grad)
    / max|z_wanda + z_grad|, shifted onto the budget (the LLM agent's no-LLM baseline)."""

    name = "zscore-greedy"
    deterministic = True

    def __init__(self, spread: float = 0.1):
        super().__init__()
        if not (isinstance(spread, (int, float)) and spread >= 0):
            raise ValueError(f"zscore-greedy spread must be a non-negative number, got {spread!r}")
        self.spread = float(spread)

    def allocate(self, ctx, target: float, seed: int = 0) -> list[float]:
        return zscore_greedy_ratios(ctx.z_wanda, ctx.z_grad, _numel(ctx), target, self.spread)



# --------------------------------------------------------------------------- one-line depth rules


class RampAgent(Agent):
    """A one-line rule: sparsity rises linearly with depth from target - spread to target + spread
    (budget-matched). Early blocks feed every later one, so they are pruned less."""

    name = "ramp"
    deterministic = True

    def __init__(self, spread: float = 0.1):
        super().__init__()
        if not (isinstance(spread, (int, float)) and 0.0 <= spread < 0.5):
            raise ValueError(f"ramp spread must be a number in [0, 0.5), got {spread!r}")
        self.spread = float(spread)

    def allocate(self, ctx, target: float, seed: int = 0) -> list[float]:
        depth = np.linspace(-1.0, 1.0, len(ctx.units))
        return match_budget(target + self.spread * depth, _numel(ctx), target)


class ProtectFirstAgent(Agent):
    """A one-line rule: the first `blocks` units at `keep` x target, the rest pruned uniformly to meet the
    budget (the first blocks' errors propagate through the whole model)."""

    name = "protect-first"
    deterministic = True

    def __init__(self, blocks: int = 1, keep: float = 0.5):
        super().__init__()
        if not (isinstance(blocks, int) and blocks >= 1):
            raise ValueError(f"protect-first blocks must be a positive integer, got {blocks!r}")
        if not (isinstance(keep, (int, float)) and 0.0 <= keep <= 1.0):
            raise ValueError(f"protect-first keep must be a number in [0, 1], got {keep!r}")
        self.blocks, self.keep = blocks, float(keep)

    def allocate(self, ctx, target: float, seed: int = 0) -> list[float]:
        n = len(ctx.units)
        if self.blocks >= n:
            raise ValueError(f"protect-first protects {self.blocks} of {n} units: leave at least one unprotected")
        numel = np.asarray(_numel(ctx), dtype=float)
        ratios = np.full(n, float(target))
        ratios[: self.blocks] = self.keep * target
        rest = (target * numel.sum() - float(np.dot(ratios[: self.blocks], numel[: self.blocks]))) \
            / numel[self.blocks:].sum()
        ratios[self.blocks:] = rest
        return match_budget(ratios, _numel(ctx), target)
