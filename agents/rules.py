"""Pure per-unit sparsity allocation rules (no environment dependency).

Every allocator returns a list of per-unit sparsity ratios whose *parameter-weighted*
mean equals the target (to 1e-9) whenever unit sizes are given, so that different rules are
compared at exactly the same global budget. The one projection used for that is
`match_budget` (additive shift + clip); AlphaPruning keeps its reference's multiplicative
scaler instead (`agents.alphapruning.alphapruning_ratios`).

Rules implemented:
- uniform: every unit gets the target.
- OWL (Yin et al., ICML 2024; luuyin/OWL `check_outlier_mean` + the `Lamda` mapping):
  blocks with more Wanda-score outliers are pruned less.
- AlphaPruning: its own module, agents/alphapruning.py (spectral fits are a concept of their own).
- z-score greedy: the paper's sensitivity profile (z-scored 10th-percentile Wanda score +
  z-scored gradient magnitude) used by a fixed rule instead of an LLM.
- random: a seeded random allocation at the same budget (a control).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from prune_env.validation import check_target

__all__ = [
    "MAX_RATIO",
    "finite_vector",
    "match_budget",
    "owl_outlier_ratio",
    "positive_sizes",
    "owl_ratios",
    "owl_ratios_from_lod",
    "random_ratios",
    "uniform_ratios",
    "zscore_greedy_pick",
    "zscore_greedy_ratios",
]

MAX_RATIO = 0.99
"""Upper clip for a unit's sparsity: a fully pruned unit breaks the forward pass."""

_BUDGET_TOL = 1e-9


# --------------------------------------------------------------------------- validation


def _check_target(target: float) -> float:
    """Budgets outside (0, 1) are refused: 0 is 'no pruning' and 1 deletes the model."""
    return check_target(target, "target sparsity")


def positive_sizes(numel: Sequence[int], length: int | None = None, what: str = "numel") -> np.ndarray:
    """Parameter counts as float64; they weight the budget, so they must be positive."""
    n = np.asarray(list(numel), dtype=np.float64)
    if n.ndim != 1 or n.size == 0:
        raise ValueError(f"{what} must be a non-empty 1-D sequence")
    if length is not None and n.size != length:
        raise ValueError(f"{what} has {n.size} entries, expected {length}")
    if not np.all(np.isfinite(n)) or np.any(n <= 0):
        raise ValueError(f"{what} entries must be positive and finite")
    return n


def finite_vector(values: Sequence[float], what: str, length: int | None = None) -> np.ndarray:
    """Finite 1-D float64 vector (NaN scores would silently poison every allocation)."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"{what} must be a non-empty 1-D sequence")
    if length is not None and v.size != length:
        raise ValueError(f"{what} has {v.size} entries, expected {length}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{what} must be finite")
    return v


# --------------------------------------------------------------------------- shared projection


def match_budget(
    ratios: Sequence[float],
    numel: Sequence[int],
    target: float,
    low: float = 0.0,
    high: float = MAX_RATIO,
) -> list[float]:
    """Shift all ratios by one constant c and clip to [low, high] so that the
    parameter-weighted sparsity sum(n * r) / sum(n) equals `target`.

    Why a shift: it keeps every difference between units that survives clipping, i.e. it
    changes a rule's *level* but not its *shape*. f(c) = sum(w * clip(r + c)) is
    continuous, non-decreasing and piecewise linear with breakpoints low - r_i and
    high - r_i, so c is found by binary search over the sorted breakpoints followed by an
    exact linear solve inside the bracketing segment (no iteration tolerance; the result
    meets the budget to float64 round-off, far below 1e-9).
    """
    r = finite_vector(ratios, "ratios")
    n = positive_sizes(numel, r.size)
    low, high, tgt = float(low), float(high), float(target)
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise ValueError(f"need finite low <= high, got low={low}, high={high}")
    if not math.isfinite(tgt) or not low <= tgt <= high:
        raise ValueError(
            f"target sparsity {tgt} cannot be met with every ratio clipped to [{low}, {high}]"
        )
    w = n / n.sum()
    if low == high:
        return [low] * r.size

    breaks = np.unique(np.concatenate([low - r, high - r]))
    values = np.clip(r[None, :] + breaks[:, None], low, high) @ w  # non-decreasing
    j = int(np.searchsorted(values, tgt, side="left"))
    if j == 0:
        shift = float(breaks[0])
    elif j >= breaks.size:
        shift = float(breaks[-1])
    else:
        b0, b1, v0, v1 = breaks[j - 1], breaks[j], values[j - 1], values[j]
        shift = float(b1) if v1 == v0 else float(b0 + (tgt - v0) * (b1 - b0) / (v1 - v0))
    out = np.clip(r + shift, low, high)
    err = float(out @ w) - tgt
    if abs(err) > _BUDGET_TOL:
        # Round-off only: absorb it in the units strictly inside (low, high).
        free = (out > low) & (out < high)
        if free.any():
            out[free] -= err / w[free].sum()
            out = np.clip(out, low, high)
    return [float(x) for x in out]


# --------------------------------------------------------------------------- uniform


def uniform_ratios(n_units: int, target: float) -> list[float]:
    """Every unit pruned at the target: the baseline all other rules are compared to."""
    tgt = _check_target(target)
    if int(n_units) != n_units or n_units < 1:
        raise ValueError(f"n_units must be a positive integer, got {n_units!r}")
    return [tgt] * int(n_units)


# --------------------------------------------------------------------------- OWL


def owl_outlier_ratio(scores: torch.Tensor, m: float = 5.0) -> float:
    """Layerwise Outlier Distribution (LOD) of one decoder block: the share (in [0, 1]) of
    entries of its flattened Wanda scores |W| * ||X||_2 (all its linears concatenated)
    that are strictly greater than m times their mean.

    OWL's `check_outlier_mean` returns the same quantity in percent; only relative values
    matter for the allocation (it is min-max normalised), so a fraction is returned.
    The mean is taken in float64 so that large fp16/bf16 blocks do not lose precision.
    """
    if m <= 0 or not math.isfinite(m):
        raise ValueError(f"outlier multiple m must be positive, got {m!r}")
    flat = scores.detach().reshape(-1).to(torch.float64)
    if flat.numel() == 0:
        raise ValueError("scores is empty")
    threshold = flat.mean() * float(m)
    return float((flat > threshold).sum().item()) / flat.numel()


def owl_ratios_from_lod(
    lod: Sequence[float],
    target: float,
    lam: float = 0.08,
    block_numel: Sequence[int] | None = None,
) -> list[float]:
    """OWL's mapping from per-block outlier ratios (LOD) to per-block sparsities.

    Reference mapping: r = (LOD - min) / (max - min) * 2*lam ; r = r - mean(r) + (1 - target);
    sparsity = 1 - r. More outliers => more density kept => less pruning; the spread
    max - min of the sparsities is exactly 2*lam and their plain mean is the target.
    (Each sparsity therefore lies in [target - 2*lam, target + 2*lam]; the paper's
    "[S - lam, S + lam]" only holds when the LOD distribution is symmetric.)

    Deviation for budget exactness: the result is passed through `match_budget` with the
    block sizes (equal weights when `block_numel` is None). With equal-sized blocks and no
    clipping this is the identity; with unequal blocks it shifts all sparsities so the
    *parameter-weighted* sparsity equals the target; if target +- 2*lam leaves
    [0, MAX_RATIO] the excess is clipped and redistributed by the same shift.
    Exposed separately so callers can compute LOD block by block and drop the scores.
    """
    tgt = _check_target(target)
    x = finite_vector(lod, "lod")
    if not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam must be a finite non-negative number, got {lam!r}")
    n = np.ones_like(x) if block_numel is None else positive_sizes(block_numel, x.size, "block_numel")
    span = float(x.max() - x.min())
    if span <= 0.0 or lam == 0.0:
        return [tgt] * x.size
    r = (x - x.min()) / span * (2.0 * lam)
    r = r - r.mean() + (1.0 - tgt)
    return match_budget(1.0 - r, n, tgt, 0.0, MAX_RATIO)


def owl_ratios(
    block_scores: Sequence[torch.Tensor],
    target: float,
    lam: float = 0.08,
    m: float = 5.0,
    block_numel: Sequence[int] | None = None,
) -> list[float]:
    """OWL per-block sparsities from each block's concatenated Wanda-score tensor
    (one tensor per decoder block): LOD via `owl_outlier_ratio`, then
    `owl_ratios_from_lod` (see there for the mapping and the budget correction)."""
    tgt = _check_target(target)
    if len(block_scores) == 0:
        raise ValueError("block_scores is empty")
    lod = [owl_outlier_ratio(s, m) for s in block_scores]
    return owl_ratios_from_lod(lod, tgt, lam, block_numel)


# --------------------------------------------------------------------------- z-score rules


def _importance(z_wanda: Sequence[float], z_grad: Sequence[float]) -> np.ndarray:
    """The profile's scalar importance: higher z(Wanda) + z(grad) = more important unit."""
    zw = finite_vector(z_wanda, "z_wanda")
    zg = finite_vector(z_grad, "z_grad", zw.size)
    return zw + zg


def zscore_greedy_ratios(
    z_wanda: Sequence[float],
    z_grad: Sequence[float],
    numel: Sequence[int],
    target: float,
    spread: float = 0.1,
) -> list[float]:
    """One-shot rule on the paper's sensitivity profile (no LLM): the more important a
    unit, the less it is pruned.

    ratio = target - spread * importance / max|importance| (importance = z_wanda + z_grad,
    so the raw ratios lie in [target - spread, target + spread]), then `match_budget`
    (shift + clip to [0, MAX_RATIO]) makes the parameter-weighted sparsity exactly the
    target. All importances zero -> uniform.
    """
    tgt = _check_target(target)
    imp = _importance(z_wanda, z_grad)
    n = positive_sizes(numel, imp.size)
    if not math.isfinite(spread) or spread < 0:
        raise ValueError(f"spread must be a finite non-negative number, got {spread!r}")
    scale = float(np.abs(imp).max())
    raw = np.full(imp.size, tgt) if scale == 0.0 else tgt - spread * imp / scale
    return match_budget(raw, n, tgt, 0.0, MAX_RATIO)


def zscore_greedy_pick(
    z_wanda: Sequence[float],
    z_grad: Sequence[float],
    sparsity: Sequence[float],
    max_sparsity: float,
    k: int,
) -> list[int]:
    """Indices of the k least important units (lowest z_wanda + z_grad) whose current
    sparsity is still below `max_sparsity` (1e-9 slack, so a unit sitting on the wall up to
    float noise counts as full), ordered by importance then index. Fewer than k are
    returned when fewer units are eligible. The iterative env's deterministic fallback
    move: prune next where the profile says it hurts least.
    """
    imp = _importance(z_wanda, z_grad)
    s = finite_vector(sparsity, "sparsity", imp.size)
    if int(k) != k or k < 0:
        raise ValueError(f"k must be a non-negative integer, got {k!r}")
    eligible = np.flatnonzero(s < float(max_sparsity) - 1e-9)
    order = sorted(eligible.tolist(), key=lambda i: (imp[i], i))
    return [int(i) for i in order[: int(k)]]


# --------------------------------------------------------------------------- random


def random_ratios(
    numel: Sequence[int],
    target: float,
    rng: np.random.Generator,
    low: float = 0.0,
    high: float = 0.95,
) -> list[float]:
    """Seeded random control at the same budget: Dirichlet(1, ..., 1) weights scaled to
    mean `target` (raw_i = U * target * w_i for U units), then `match_budget` into
    [low, high] so the parameter-weighted sparsity equals the target exactly.
    Deterministic for a given generator state (consumes one Dirichlet draw)."""
    tgt = _check_target(target)
    n = positive_sizes(numel)
    if not low <= tgt <= high:
        raise ValueError(f"target {tgt} must lie in [low, high] = [{low}, {high}]")
    weights = rng.dirichlet(np.ones(n.size))
    return match_budget(weights * n.size * tgt, n, tgt, low, high)
