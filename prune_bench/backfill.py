"""The answer-balanced knowledge metric for results.json files written before it existed.

Why: the committed studies were measured before prune_env/data/knowledge.py, so their tables show the plain
retention, which frequent answers can game (issue #26). Every such file already holds what the balanced
metric needs except the facts' names: the dense and each cell's per-fact greedy-exact and correct flags.
The held-out facts are a deterministic selection (source, seed, offset, count in the file's own config),
rebuilt here without the model; their count must match the flags. The fields are then computed by the
same `knowledge_fields` the env's `Metrics` uses, so a backfilled record reads as if it had been measured
with the metric. Nothing is re-measured; records without per-fact flags (failed cells) stay as they are.
"""

from __future__ import annotations

from prune_env.data.facts import Fact
from prune_env.data.knowledge import knowledge_fields, majority_baseline

from .bench_config import BenchmarkConfig
from .heldout import heldout_facts
from .intervals import fact_labels


def needs_backfill(data: dict) -> bool:
    """True when the dense facts have no relation/answer names (a file from before the balanced metric)."""
    return "greedy_exact" in (data.get("dense_per_fact") or {}) and fact_labels(data) is None


def backfill_knowledge(data: dict, facts: list[Fact] | None = None) -> dict:
    """`data` with the facts' names, the majority baselines and each record's balanced fields added.

    facts: the held-out facts (None: rebuilt from the file's own config with `heldout_facts`)."""
    if not needs_backfill(data):
        return data
    if facts is None:
        facts = heldout_facts(BenchmarkConfig.from_dict(data["config"]))
    dense = data["dense_per_fact"]["greedy_exact"]
    if len(facts) != len(dense):
        raise ValueError(f"the file's config selects {len(facts)} held-out facts but it holds flags for "
                         f"{len(dense)}: it was made with other facts; rerun its benchmark instead")
    names = {"relation": [f.relation for f in facts], "answer": [f.answer for f in facts]}
    records = []
    for record in data["records"]:
        per_fact = record.get("per_fact")
        if record.get("status") == "ok" and per_fact is not None:
            record = {**record, **knowledge_fields(facts, dense, per_fact["greedy_exact"], per_fact["correct"],
                                                        per_fact.get("answer_nll"))}
        records.append(record)
    return {**data, "dense_per_fact": {**data["dense_per_fact"], **names}, "records": records,
            "knowledge_baseline": majority_baseline(facts, dense).as_dict()}
