"""Fronts and hypervolume (prune_bench/fronts.py) on synthetic records with known geometry."""

from __future__ import annotations

import numpy as np
import pytest

from prune_bench.fronts import front_mask, fronts, hypervolume, plot_fronts

N_WINDOWS, TOKENS = 8, 100
# two relations; relation "a" has one answer shared by 3 facts, relation "b" 3 distinct answers
RELATIONS = ["a", "a", "a", "b", "b", "b"]
ANSWERS = ["x", "x", "x", "p", "q", "r"]
DENSE = [True] * 6


def record(nll_per_token: float, exact: list[bool], rng: np.random.Generator) -> dict:
    noise = rng.normal(0, 0.05, N_WINDOWS)
    return {"per_window": {"nll": list((nll_per_token + noise) * TOKENS), "tokens": [TOKENS] * N_WINDOWS},
            "per_fact": {"correct": exact, "greedy_exact": exact}}


def seeds(nll: float, exact: list[bool], n: int = 2, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [record(nll, exact, rng) for _ in range(n)]


def test_front_mask_keeps_only_non_dominated_points():
    x = np.array([0.0, 0.1, 0.2, 0.15])
    y = np.array([0.1, 0.5, 0.4, 0.5])
    assert front_mask(x, y).tolist() == [True, True, False, False]  # (0.15, 0.5) is dominated by (0.1, 0.5)


def test_hypervolume_of_one_point_is_its_box_and_dominated_points_add_nothing():
    assert hypervolume([0.1], [0.5], x_ref=0.6) == pytest.approx(0.25)
    assert hypervolume([0.1, 0.3], [0.5, 0.4], x_ref=0.6) == pytest.approx(0.25)
    # a second non-dominated point adds its own strip: [0, 0.1] x [0, 0.2]
    assert hypervolume([0.0, 0.1], [0.2, 0.5], x_ref=0.6) == pytest.approx(0.25 + 0.1 * 0.2)
    # outside the box (worse than x_ref or below y_ref) counts for nothing; NaN is ignored
    assert hypervolume([0.7, np.nan], [0.9, 0.9], x_ref=0.6) == 0.0
    # leading axes are independent sets
    assert hypervolume(np.array([[0.1], [0.3]]), np.array([[0.5], [0.5]]), x_ref=0.6).tolist() == \
        pytest.approx([0.25, 0.15])


def test_an_agent_that_dominates_gets_the_larger_hypervolume_and_uniform_sits_at_x_zero():
    uniform = seeds(3.0, [True, False, False, True, False, False], seed=1)
    points = {
        "uniform": {"-": uniform},
        "better": {"w=0": seeds(2.9, [True, False, False, True, False, False], seed=2),
                   "w=1": seeds(3.1, [True, True, False, True, True, True], seed=3)},
    }
    result = fronts(points, uniform, DENSE, (RELATIONS, ANSWERS), n_resamples=200)
    assert result["uniform"].log_ppl_ratio[0] == pytest.approx(0.0)
    assert result["better"].hypervolume > result["uniform"].hypervolume
    for summary in result.values():
        assert summary.low <= summary.hypervolume <= summary.high
    assert result["better"].on_front.all()  # the two settings trade off: neither dominates the other
    # balanced: relation a's one answer group keeps 1/3 then 2/3 of its facts; b keeps 1 of 3 answers, then 3
    assert result["better"].retention.tolist() == pytest.approx([(1 / 3 + 1 / 3) / 2, (2 / 3 + 1) / 2])


def test_a_model_answering_the_frequent_answer_cannot_buy_hypervolume_with_it():
    """Plain retention prefers the model that keeps the three facts of one frequent answer (3/6 against
    2/6); answer-balanced retention (and so the hypervolume) prefers the one that keeps two answers."""
    relations, answers = ["a", "a", "a", "a", "b", "b"], ["x", "x", "x", "y", "p", "q"]
    uniform = seeds(3.0, [False] * 6, seed=1)
    frequent = seeds(3.0, [True, True, True, False, False, False], seed=4)  # balanced (1/2 + 0) / 2
    diverse = seeds(3.0, [False, False, False, True, True, False], seed=4)  # same perplexity; (1/2 + 1/2) / 2
    result = fronts({"frequent": {"-": frequent}, "diverse": {"-": diverse}}, uniform, DENSE,
                    (relations, answers), n_resamples=100)
    assert result["frequent"].retention[0] == pytest.approx(0.25)
    assert result["diverse"].retention[0] == pytest.approx(0.5)
    assert result["diverse"].hypervolume == pytest.approx(2 * result["frequent"].hypervolume)


def test_mismatched_labels_are_refused():
    uniform = seeds(3.0, [True] * 6)
    with pytest.raises(ValueError, match="labels name 5 facts but dense_exact has 6"):
        fronts({"u": {"-": uniform}}, uniform, DENSE, (RELATIONS[:5], ANSWERS[:5]))


def test_plot_fronts_writes_a_figure(tmp_path):
    uniform = seeds(3.0, [True, False, False, True, False, False])
    result = fronts({"uniform": {"-": uniform}}, uniform, DENSE, (RELATIONS, ANSWERS), n_resamples=20)
    path = tmp_path / "front_t0.5.png"
    plot_fronts(result, 0.5, path)
    assert path.stat().st_size > 1000
