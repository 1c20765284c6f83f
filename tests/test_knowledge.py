"""The answer-balanced knowledge metric (issue #26): a model that always gives a relation's most frequent
answer scores exactly the majority baseline on it, and more on the plain retention it used to game."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest

from prune_env.context import PruningContext
from prune_env.data.evaluation import FactScores, retention
from prune_env.data.facts import Fact, load_facts
from prune_env.pruning.scoring import cache_dir
from prune_env.data.knowledge import (BalancedIndex, balanced_accuracy, balanced_answer_ppl, balanced_retention,
                                     majority_baseline, majority_flags)


def _facts(rows: list[tuple[str, str]]) -> list[Fact]:
    return [Fact(f"{relation} {i}", answer, (answer,), relation) for i, (relation, answer) in enumerate(rows)]


# continent: Africa x4, Asia, Europe; symbol: two unique answers; a fact the dense model does not know
ROWS = [("continent", "Africa")] * 4 + [("continent", "Asia"), ("continent", "Europe"),
                                        ("symbol", "H"), ("symbol", "He"), ("continent", "Oceania")]
KNOWN = [True] * 8 + [False]


def test_always_the_majority_answer_gets_exactly_the_baseline_and_games_the_plain_metric():
    facts = _facts(ROWS)
    fake = majority_flags(facts, KNOWN)  # the degenerate pruned model: right exactly where the answer is Africa/H
    assert fake == [True] * 4 + [False, False, True, False, False]
    baseline = majority_baseline(facts, KNOWN)
    balanced, by_relation = balanced_retention(facts, KNOWN, fake)
    assert balanced == baseline.fact_retention_balanced
    assert by_relation == baseline.retention_by_relation
    # by hand: continent 1 of 3 known answers, symbol 1 of 2, relations weigh the same
    assert by_relation == pytest.approx({"continent": 1 / 3, "symbol": 1 / 2}, abs=1e-15)
    assert balanced == pytest.approx((1 / 3 + 1 / 2) / 2, abs=1e-15)
    plain = retention(KNOWN, fake)
    assert plain == baseline.fact_retention == 5 / 8  # 4 Africa + H of the 8 known facts
    assert plain > balanced  # the gaming the issue describes
    assert baseline.plain_by_relation == {"continent": 4 / 6, "symbol": 1 / 2}
    assert baseline.answers == {"continent": "Africa", "symbol": "H"}


def test_balanced_retention_by_hand_and_bounds():
    facts = _facts(ROWS)
    everything = balanced_retention(facts, KNOWN, [True] * 9)
    assert everything == (1.0, {"continent": 1.0, "symbol": 1.0})
    assert balanced_retention(facts, KNOWN, [False] * 9) == (0.0, {"continent": 0.0, "symbol": 0.0})
    # half of the Africa group and Asia kept, He kept; the unknown Oceania fact never counts
    kept = [True, True, False, False, True, False, False, True, True]
    value, by_relation = balanced_retention(facts, KNOWN, kept)
    assert by_relation["continent"] == pytest.approx((0.5 + 1 + 0) / 3, abs=1e-15)
    assert by_relation["symbol"] == 0.5
    assert value == pytest.approx(((0.5 + 1 + 0) / 3 + 0.5) / 2, abs=1e-15)
    nothing, none = balanced_retention(facts, [False] * 9, kept)
    assert math.isnan(nothing) and none == {}
    with pytest.raises(ValueError, match="same facts"):
        balanced_retention(facts, KNOWN, kept[:-1])


def test_resample_weights_equal_scoring_the_duplicated_facts():
    """The bootstrap's weighted form is the metric itself on the resampled list of facts."""
    rng = np.random.default_rng(3)
    rows = [("a", x) for x in "ppppqqr"] + [("b", x) for x in "stuu"] + [("c", "v")]
    facts = _facts(rows)
    known = rng.random(len(facts)) < 0.8
    exact = rng.random((2, len(facts))) < 0.5
    draws = rng.integers(0, len(facts), size=(5, len(facts)))
    weights = np.stack([np.bincount(d, minlength=len(facts)) for d in draws])
    overall, per_relation = BalancedIndex.of_facts(facts).means(exact, known, weights)
    assert overall.shape == (2, 5) and per_relation.shape == (2, 5, 3)
    for m in range(2):
        for k, draw in enumerate(draws):
            picked = [facts[i] for i in draw]
            direct, _ = balanced_retention(picked, known[draw].tolist(), exact[m, draw].tolist())
            assert overall[m, k] == pytest.approx(direct, abs=1e-12, nan_ok=True)


def test_balanced_accuracy_counts_every_fact_and_weighs_answers_equally():
    facts = _facts(ROWS)
    always_africa = [f.answer == "Africa" for f in facts]
    assert sum(always_africa) / len(facts) == 4 / 9
    assert balanced_accuracy(facts, always_africa) == pytest.approx((1 / 4 + 0) / 2, abs=1e-15)
    assert balanced_accuracy(facts, [True] * 9) == 1.0


def test_balanced_answer_ppl_weighs_answers_equally_and_is_a_perplexity():
    facts = _facts(ROWS)
    # continent: Africa x4 (NLL 1 each), Asia 3, Europe 3, Oceania 3 -> 4 answers averaging 2.5; symbol: 0 and 2 -> 1
    nll = [1.0] * 4 + [3.0, 3.0, 0.0, 2.0, 3.0]
    assert balanced_answer_ppl(facts, nll) == pytest.approx(math.exp((2.5 + 1.0) / 2))
    # one nat less on the frequent answer (4 facts of Africa) counts as much as on one rare fact (Asia)
    frequent = [0.0] * 4 + nll[4:]
    rare = nll[:4] + [2.0] + nll[5:]
    assert balanced_answer_ppl(facts, frequent) == pytest.approx(balanced_answer_ppl(facts, rare))
    assert balanced_answer_ppl(facts, [0.0] * 9) == 1.0  # every answer certain
    with pytest.raises(ValueError, match="8 per-fact values for 9 facts"):
        balanced_answer_ppl(facts, nll[:8])


@pytest.mark.parametrize("source", ["offline", "offline-balanced"])
def test_majority_baseline_on_the_offline_facts(source):
    """With every fact known, the balanced baseline is 1 / distinct answers exactly, per relation."""
    facts = load_facts(source)
    known = [True] * len(facts)
    baseline = majority_baseline(facts, known)
    answers: dict[str, Counter] = {}
    for f in facts:
        answers.setdefault(f.relation, Counter())[f.answer] += 1
    for relation, counts in answers.items():
        assert baseline.retention_by_relation[relation] == pytest.approx(1 / len(counts), abs=1e-15)
        top = max(counts.values())
        assert Fraction(baseline.plain_by_relation[relation]).limit_denominator(10_000) == \
            Fraction(top, sum(counts.values()))
    fake = majority_flags(facts, known)
    assert balanced_retention(facts, known, fake)[0] == baseline.fact_retention_balanced
    if source == "offline":  # 58 of the 252 continent facts are Africa: plain 0.23 against balanced 1/7
        assert baseline.plain_by_relation["country_continent"] == 58 / 252
        assert baseline.retention_by_relation["country_continent"] == pytest.approx(1 / 7)
    else:  # at most 3 facts per answer: repeating one answer earns almost nothing on either metric
        assert max(baseline.plain_by_relation.values()) <= 3 / 21 + 1e-12
        assert baseline.fact_retention < 0.03


def test_context_metrics_carry_the_balanced_fields(tiny_data):
    ctx = PruningContext("tiny-llama", data=tiny_data)
    assert ctx.dense.fact_retention_balanced in (0.0, 1.0)
    facts = ctx.facts
    dense_exact = [i % 3 != 0 for i in range(len(facts))]
    pruned_exact = [i % 2 == 0 for i in range(len(facts))]
    correct = [i % 4 == 0 for i in range(len(facts))]
    answer_nll = [0.5 + i for i in range(len(facts))]
    scores = FactScores(accuracy=sum(correct) / len(facts), nll=1.0, greedy_exact=pruned_exact, correct=correct,
                        answer_nll=answer_nll)
    metrics = ctx.metrics(10.0, scores, dense_exact)
    assert (metrics.fact_retention_balanced, metrics.retention_by_relation) == \
        balanced_retention(facts, dense_exact, pruned_exact)
    assert metrics.fact_acc_balanced == balanced_accuracy(facts, correct)
    assert metrics.fact_answer_ppl_balanced == balanced_answer_ppl(facts, answer_nll)
    as_dict = metrics.as_dict()
    assert {"fact_retention_balanced", "fact_acc_balanced", "fact_answer_ppl_balanced",
            "retention_by_relation"} <= set(as_dict)
    assert "greedy_exact" not in as_dict
    # the proxy scores the first facts only: the same prefix of the context's facts is used
    head = FactScores(accuracy=0.0, nll=1.0, greedy_exact=pruned_exact[:4], correct=correct[:4],
                      answer_nll=answer_nll[:4])
    assert ctx.metrics(10.0, head, dense_exact[:4]).fact_retention_balanced == \
        balanced_retention(facts[:4], dense_exact[:4], pruned_exact[:4])[0]
    other = [dataclasses.replace(f, relation="other") for f in facts[:4]]  # facts the caller names
    assert ctx.metrics(10.0, head, dense_exact[:4], questions=other).retention_by_relation == \
        balanced_retention(other, dense_exact[:4], pruned_exact[:4])[1]
    ctx.dense = dataclasses.replace(ctx.dense, greedy_exact=dense_exact)  # a dense model that knows some facts
    assert ctx.knowledge_baseline == majority_baseline(facts, dense_exact)
    assert ctx.knowledge_baseline is ctx.knowledge_baseline  # computed once per context


def test_dense_cache_without_the_balanced_fields_is_rebuilt(tiny_data, tmp_path, monkeypatch):
    """A dense-metrics cache written before the balanced fields existed is rebuilt, not read without them."""
    monkeypatch.setenv("PRUNE_GYM_CACHE", str(tmp_path))
    data = tiny_data
    first = PruningContext("tiny-llama", data=data)
    paths = list(cache_dir().glob("dense-*.json"))
    assert len(paths) == 1
    old = json.loads(paths[0].read_text())
    for key in ("fact_retention_balanced", "fact_acc_balanced", "retention_by_relation"):
        old.pop(key)
    paths[0].write_text(json.dumps(old))
    with pytest.warns(RuntimeWarning, match="rebuilt"):
        again = PruningContext("tiny-llama", data=data)
    assert again.dense == first.dense
    assert "retention_by_relation" in json.loads(paths[0].read_text())
