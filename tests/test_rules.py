"""The allocation rules (agents/rules.py) checked against independent hand computations on small inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from agents.rules import (
    MAX_RATIO,
    match_budget,
    owl_outlier_ratio,
    owl_ratios,
    owl_ratios_from_lod,
    random_ratios,
    uniform_ratios,
    zscore_greedy_pick,
    zscore_greedy_ratios,
)
from agents.alphapruning import alphapruning_ratios, hill_alpha


def weighted(ratios, numel) -> float:
    return sum(r * n for r, n in zip(ratios, numel)) / sum(numel)


def rotated(singular_values, rows: int, seed: int = 0) -> torch.Tensor:
    """rows x k matrix U diag(s) V^T with the given singular values (k = len(s))."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.as_tensor(singular_values, dtype=torch.float64)
    k = s.numel()
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=torch.float64))
    return u @ torch.diag(s) @ v.T


# ----------------------------------------------------------------------------- match_budget


def test_match_budget_hand_case_with_clipping():
    # 2(0.5 + c) + min(1.2 + c, 0.99) = 1.8  ->  c = -0.095, third unit stays clipped.
    out = match_budget([0.5, 0.5, 1.2], [1, 1, 1], 0.6)
    assert out == pytest.approx([0.405, 0.405, 0.99], abs=1e-12)


def test_match_budget_weighted_shift_without_clipping():
    # shift c: (0.2 + c) * 1 + (0.6 + c) * 3 = 0.5 * 4  ->  c = 0
    assert match_budget([0.2, 0.6], [1, 3], 0.5) == pytest.approx([0.2, 0.6], abs=1e-12)
    # (0.2 + c) + 3 (0.6 + c) = 4 * 0.4  ->  c = -0.1
    assert match_budget([0.2, 0.6], [1, 3], 0.4) == pytest.approx([0.1, 0.5], abs=1e-12)


def test_match_budget_exact_on_random_inputs():
    rng = np.random.default_rng(0)
    for _ in range(50):
        size = int(rng.integers(1, 40))
        ratios = rng.normal(0.5, 0.4, size)
        numel = rng.integers(1, 10_000, size)
        target = float(rng.uniform(0.05, 0.95))
        out = match_budget(ratios, numel, target, 0.0, 0.99)
        assert abs(weighted(out, numel) - target) < 1e-9
        assert min(out) >= 0.0 and max(out) <= 0.99
        # order preserved (monotone shift + clip)
        order = np.argsort(ratios, kind="stable")
        assert np.all(np.diff(np.asarray(out)[order]) >= -1e-15)


def test_match_budget_infeasible():
    with pytest.raises(ValueError, match="cannot be met"):
        match_budget([0.5, 0.5], [1, 1], 0.995, 0.0, 0.99)


# ----------------------------------------------------------------------------- uniform


def test_uniform():
    assert uniform_ratios(3, 0.5) == [0.5, 0.5, 0.5]


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_target_outside_open_interval_rejected(bad):
    msg = r"target sparsity=.* (is outside the allowed range|is not a number: give a number in) \(0, 1\)"
    with pytest.raises(ValueError, match=msg):
        uniform_ratios(4, bad)
    with pytest.raises(ValueError, match=msg):
        owl_ratios_from_lod([0.1, 0.2], bad)
    with pytest.raises(ValueError, match=msg):
        alphapruning_ratios([2.0, 3.0], [1, 1], bad)
    with pytest.raises(ValueError, match=msg):
        zscore_greedy_ratios([0.0, 1.0], [0.0, 1.0], [1, 1], bad)
    with pytest.raises(ValueError, match=msg):
        random_ratios([1, 1], bad, np.random.default_rng(0))


# ----------------------------------------------------------------------------- OWL


def block_with_outliers(n_total: int, n_out: int, big: float = 100.0) -> torch.Tensor:
    t = torch.ones(n_total)
    t[:n_out] = big
    return t[torch.randperm(n_total, generator=torch.Generator().manual_seed(n_out))]


def test_owl_outlier_ratio_by_hand():
    # 98 ones + 2 x 100: mean 2.98, threshold 14.9 -> 2 of 100 are outliers.
    assert owl_outlier_ratio(block_with_outliers(100, 2)) == pytest.approx(0.02)
    # all equal: nothing exceeds 5 x mean
    assert owl_outlier_ratio(torch.full((7, 3), 2.0)) == 0.0
    # strict ">": [0, 0, 0, 0, 1] has mean 0.2, threshold 1.0, and 1.0 is not > 1.0
    assert owl_outlier_ratio(torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])) == 0.0
    # m changes the threshold: mean 2.98, m=2 -> 5.96, still 2 outliers; m=40 -> 119.2, none
    assert owl_outlier_ratio(block_with_outliers(100, 2), m=40.0) == 0.0


def test_owl_ratios_three_blocks_by_hand():
    blocks = [block_with_outliers(100, 2), block_with_outliers(100, 0), block_with_outliers(100, 5)]
    # LOD = [0.02, 0.0, 0.05]; r = LOD / 0.05 * 0.16 = [0.064, 0.0, 0.16]; mean(r) = 0.224 / 3
    mean_r = 0.224 / 3
    expected = [0.7 + mean_r - 0.064, 0.7 + mean_r, 0.7 + mean_r - 0.16]
    out = owl_ratios(blocks, 0.7, lam=0.08, m=5.0)
    assert out == pytest.approx(expected, abs=1e-12)
    assert sum(out) / 3 == pytest.approx(0.7, abs=1e-12)
    assert max(out) - min(out) == pytest.approx(0.16, abs=1e-12)  # spread is exactly 2*lam
    # more outliers -> lower sparsity
    assert out[2] < out[0] < out[1]


def test_owl_unequal_blocks_meet_weighted_budget_by_shift():
    lod = [0.02, 0.0, 0.05]
    numel = [100, 300, 600]
    plain = owl_ratios_from_lod(lod, 0.7)
    out = owl_ratios_from_lod(lod, 0.7, block_numel=numel)
    assert abs(weighted(out, numel) - 0.7) < 1e-9
    shift = out[0] - plain[0]
    assert out == pytest.approx([p + shift for p in plain], abs=1e-12)  # shape preserved
    # by hand: plain is [0.7107, 0.7747, 0.6147]; shift = 0.7 - weighted(plain)
    assert shift == pytest.approx(0.7 - weighted(plain, numel), abs=1e-12)


def test_owl_clipping_redistributes():
    out = owl_ratios_from_lod([0.0, 0.5, 1.0], 0.95, lam=0.08, block_numel=[1, 1, 2])
    assert max(out) <= MAX_RATIO
    assert abs(weighted(out, [1, 1, 2]) - 0.95) < 1e-9


def test_owl_all_equal_is_uniform():
    assert owl_ratios_from_lod([0.3, 0.3, 0.3], 0.6) == [0.6, 0.6, 0.6]


# ----------------------------------------------------------------------------- hill_alpha


def reference_alpha(eigs: np.ndarray, bins: int, window: str) -> float:
    """Independent, loop-based evaluation of the xmin_peak procedure on known eigenvalues
    (torch.histc for the histogram, explicit sums for Hill and KS)."""
    eigs = torch.as_tensor(np.sort(eigs), dtype=torch.float64)
    log10 = torch.log10(eigs)
    counts = torch.histc(log10, bins, min=float(log10.min()), max=float(log10.max()))
    edges = torch.linspace(float(log10.min()), float(log10.max()), bins + 1, dtype=torch.float64)
    xmin2 = 10 ** float(edges[int(torch.argmax(counts))])
    lower = math.log10(0.95 * xmin2) if window == "reference" else 0.95 * xmin2
    best_d, best_alpha = math.inf, None
    n_total = len(eigs)
    for i in range(n_total - 1):
        xmin = float(eigs[i])
        if xmin < lower:
            continue
        if xmin > 1.5 * xmin2:
            break
        n = n_total - i
        alpha = 1 + n / sum(math.log(float(eigs[j]) / xmin) for j in range(i, n_total))
        d = max(
            abs(1 - (float(eigs[i + k]) / xmin) ** (1 - alpha) - k / n) for k in range(n)
        )
        if d < best_d:
            best_d, best_alpha = d, alpha
    return best_alpha


def test_hill_alpha_single_candidate_by_hand():
    # eigenvalues 1, 2, 10, 100, 1000; with 3 bins on log10 in [0, 3] the first bin {0, 0.30}
    # ties with the last {2, 3} and wins (first max); xmin2 = 1, window [.., 1.5] holds only 1.
    eigs = np.array([1.0, 2.0, 10.0, 100.0, 1000.0])
    w = rotated(np.sqrt(eigs), rows=7)
    expected = 1 + 5 / (math.log(2) + math.log(10) + math.log(100) + math.log(1000))
    assert hill_alpha(w, bins=3) == pytest.approx(expected, rel=1e-9)
    assert hill_alpha(w, bins=3, xmin_window="intended") == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("window", ["reference", "intended"])
def test_hill_alpha_matches_direct_evaluation(window):
    rng = np.random.default_rng(3)
    s = np.sqrt(np.sort(rng.pareto(2.0, 40) + 1.0) * 3.0)  # eigenvalues >= 3, heavy tail
    w = rotated(s, rows=60, seed=1)
    for bins in (10, 100):
        expected = reference_alpha(s**2, bins, window)
        assert hill_alpha(w, bins=bins, xmin_window=window) == pytest.approx(expected, rel=1e-9)


def test_hill_alpha_window_modes_differ_where_expected():
    # bulk at [1, 2], peak bulk at [4, 5], Pareto tail above 5: the 'reference' window
    # (lower bound log10(0.95 * xmin2)) also tries xmins in the [1, 2] bulk, 'intended' does not.
    rng = np.random.default_rng(11)
    eigs = np.concatenate(
        [rng.uniform(1, 2, 15), rng.uniform(4, 5, 20), 5 * (rng.pareto(1.5, 10) + 1)]
    )
    w = rotated(np.sqrt(eigs), rows=50, seed=4)
    ref = hill_alpha(w, bins=10)
    intended = hill_alpha(w, bins=10, xmin_window="intended")
    assert ref == pytest.approx(reference_alpha(eigs, 10, "reference"), rel=1e-9)
    assert intended == pytest.approx(reference_alpha(eigs, 10, "intended"), rel=1e-9)
    assert abs(ref - intended) > 0.1


def test_hill_alpha_recovers_power_law_and_is_monotone():
    def spectrum(a: float, n: int = 150) -> np.ndarray:
        q = (np.arange(n) + 0.5) / n  # exact quantiles of a Pareto(xmin=1, exponent a)
        return (1 - q) ** (-1.0 / (a - 1.0))

    light = hill_alpha(rotated(np.sqrt(spectrum(4.0)), rows=150, seed=2))
    heavy = hill_alpha(rotated(np.sqrt(spectrum(2.0)), rows=150, seed=2))
    assert light == pytest.approx(4.0, rel=0.15)
    assert heavy == pytest.approx(2.0, rel=0.15)
    assert heavy < light


def test_hill_alpha_degenerate_spectrum_raises():
    with pytest.raises(ValueError, match="degenerate"):
        hill_alpha(torch.eye(5))


# ----------------------------------------------------------------------------- AlphaPruning


def test_alphapruning_by_hand():
    # base = [0.7, 1.0, 1.3]; sum(n * base) = 4.3; scaler = 4 * 0.5 / 4.3
    out = alphapruning_ratios([2.0, 3.0, 4.0], [1, 1, 2], 0.5, eps=0.3)
    scaler = 2.0 / 4.3
    assert out == pytest.approx([0.7 * scaler, 1.0 * scaler, 1.3 * scaler], abs=1e-12)
    assert abs(weighted(out, [1, 1, 2]) - 0.5) < 1e-9
    # smaller alpha -> smaller ratio, also when the input order is shuffled
    out2 = alphapruning_ratios([4.0, 2.0, 3.0], [1, 1, 1], 0.5)
    assert out2[1] < out2[2] < out2[0]


def test_alphapruning_block_wise_by_hand():
    # unit means [3, 3, 4] -> base [0.7, 0.7, 1.3]; unit sizes [2, 2, 2]; scaler = 3 / 5.4
    out = alphapruning_ratios(
        [2.0, 4.0, 3.0, 3.0, 6.0, 2.0], [1] * 6, 0.5, eps=0.3, unit_of_layer=[0, 0, 1, 1, 2, 2]
    )
    scaler = 3.0 / 5.4
    assert out == pytest.approx([0.7 * scaler, 0.7 * scaler, 1.3 * scaler], abs=1e-12)


def test_alphapruning_clip_resolves_scaler():
    # base [0.7, 1.3], scaler 0.9 -> [0.63, 1.17]; cap 0.99 and re-solve: 0.99 + 0.7 s = 1.8
    out = alphapruning_ratios([1.0, 2.0], [1, 1], 0.9, eps=0.3)
    assert out == pytest.approx([0.81, 0.99], abs=1e-12)
    assert abs(weighted(out, [1, 1]) - 0.9) < 1e-9


def test_alphapruning_equal_alphas_uniform():
    assert alphapruning_ratios([2.5, 2.5], [3, 7], 0.6) == pytest.approx([0.6, 0.6], abs=1e-12)


# ----------------------------------------------------------------------------- z-score rules


def test_zscore_greedy_ratios_by_hand():
    # importance [1.5, -1.5, 0], max |.| = 1.5 -> ratios 0.7 - 0.1 * [1, -1, 0]
    out = zscore_greedy_ratios([1.0, -1.0, 0.0], [0.5, -0.5, 0.0], [1, 1, 1], 0.7, spread=0.1)
    assert out == pytest.approx([0.6, 0.8, 0.7], abs=1e-12)
    # unequal sizes: shifted by c with (0.6 + c) + 2 (0.8 + c) + (0.7 + c) = 4 * 0.7 -> c = -0.025
    out = zscore_greedy_ratios([1.0, -1.0, 0.0], [0.5, -0.5, 0.0], [1, 2, 1], 0.7, spread=0.1)
    assert out == pytest.approx([0.575, 0.775, 0.675], abs=1e-12)
    assert abs(weighted(out, [1, 2, 1]) - 0.7) < 1e-9


def test_zscore_greedy_ratios_zero_importance_uniform():
    assert zscore_greedy_ratios([0, 0], [0, 0], [5, 9], 0.4) == pytest.approx([0.4, 0.4])


def test_zscore_greedy_pick():
    zw = [0.5, -1.0, 0.0, -1.0, 2.0]
    zg = [0.0, 0.0, -0.2, 0.0, -3.0]
    # importance [0.5, -1.0, -0.2, -1.0, -1.0]; unit 3 is at the wall
    sparsity = [0.1, 0.2, 0.3, 0.8, 0.0]
    assert zscore_greedy_pick(zw, zg, sparsity, 0.8, 2) == [1, 4]  # tie -> lower index first
    assert zscore_greedy_pick(zw, zg, sparsity, 0.8, 3) == [1, 4, 2]
    assert zscore_greedy_pick(zw, zg, sparsity, 0.8, 10) == [1, 4, 2, 0]
    assert zscore_greedy_pick(zw, zg, [0.8] * 5, 0.8, 2) == []
    assert zscore_greedy_pick(zw, zg, sparsity, 0.8, 0) == []


# ----------------------------------------------------------------------------- random


def test_random_ratios_deterministic_and_exact():
    numel = [10, 20, 30, 40, 50]
    a = random_ratios(numel, 0.6, np.random.default_rng(7))
    b = random_ratios(numel, 0.6, np.random.default_rng(7))
    c = random_ratios(numel, 0.6, np.random.default_rng(8))
    assert a == b
    assert a != c
    for r in (a, c):
        assert abs(weighted(r, numel) - 0.6) < 1e-9
        assert min(r) >= 0.0 and max(r) <= 0.95
