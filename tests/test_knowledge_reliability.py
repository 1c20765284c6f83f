"""scripts/knowledge_reliability.py: split-half reliability of the knowledge metrics across allocations."""

from __future__ import annotations

import numpy as np
import pytest
from script_modules import load_script


def _results(n_allocations: int = 30, n_facts: int = 400) -> dict:
    """Allocations whose answer NLL carries an allocation effect (plus per-fact noise), and whose flags are
    pure coin flips: a reliable metric and two that only measure the facts' draw."""
    rng = np.random.default_rng(0)
    relations = [f"r{i % 4}" for i in range(n_facts)]
    answers = [f"a{i % 37}" for i in range(n_facts)]
    effect = np.linspace(0.0, 1.0, n_allocations)
    records = []
    for k in range(n_allocations):
        records.append({"agent": f"agent{k}", "seed": 0, "target_sparsity": 0.5, "status": "ok",
                        "reused_from_seed": None,
                        "per_fact": {"answer_nll": (2.0 + effect[k] + rng.normal(0, 1.0, n_facts)).tolist(),
                                     "correct": (rng.random(n_facts) < 0.5).tolist(),
                                     "greedy_exact": (rng.random(n_facts) < 0.3).tolist()}})
    # a reused record is not another allocation
    records.append({**records[0], "per_fact": dict(records[0]["per_fact"]), "seed": 1, "reused_from_seed": 0})
    return {"records": records, "dense_per_fact": {"greedy_exact": [True] * n_facts, "relation": relations,
                                                   "answer": answers}}


def test_a_metric_with_an_allocation_effect_is_reliable_and_coin_flips_are_not():
    module = load_script("knowledge_reliability")
    table = module.reliability(_results(), splits=20)
    row = table[0.5]
    assert row["allocations"] == 30
    assert row["answer perplexity"] > 0.8
    assert abs(row["balanced accuracy"]) < 0.4 and abs(row["balanced retention"]) < 0.4
    assert module.reliability(_results(), splits=20) == table  # seeded
    text = module.markdown(table, 20)
    assert "| 0.5 | 30 |" in text


def test_records_without_answer_nll_or_labels():
    module = load_script("knowledge_reliability")
    old = _results()
    for record in old["records"]:
        record["per_fact"].pop("answer_nll")
    assert module.reliability(old, splits=5)[0.5]["answer perplexity"] is None
    unlabeled = _results()
    unlabeled["dense_per_fact"] = {"greedy_exact": unlabeled["dense_per_fact"]["greedy_exact"]}
    with pytest.raises(ValueError, match="no relation/answer per fact"):
        module.reliability(unlabeled)
