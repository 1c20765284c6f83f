"""Tests for prune_env.data.facts: offline cloze facts, JSONL loading, stratified limits."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from prune_env.data.corpus import SourceUnavailableError
from prune_env.data.facts import RELATIONS, Fact, build_offline_facts, load_facts, relation_counts


@pytest.fixture(scope="module")
def offline() -> list[Fact]:
    return build_offline_facts(seed=0)


def _by_prompt(facts: list[Fact]) -> dict[str, Fact]:
    return {f.prompt: f for f in facts}


# ----------------------------------------------------------------------------- offline


def test_offline_size_and_relations(offline: list[Fact]) -> None:
    assert 800 <= len(offline) <= 1000
    counts = relation_counts(offline)
    assert set(counts) == set(RELATIONS)
    assert counts["element_symbol"] == 118 and counts["state_capital"] == 50
    assert len({(f.prompt, f.answer) for f in offline}) == len(offline)  # no duplicates


def test_offline_choices(offline: list[Fact]) -> None:
    answers = {r: {f.answer for f in offline if f.relation == r} for r in RELATIONS}
    for f in offline:
        assert f.answer and f.answer in f.choices
        assert len(f.choices) == 4 and len(set(f.choices)) == 4
        assert set(f.choices) <= answers[f.relation]  # distractors come from the same relation
        assert f.prompt == f.prompt.strip()  # the evaluator appends " " + answer


def test_offline_spot_checks(offline: list[Fact]) -> None:
    by = _by_prompt(offline)
    assert by["The capital of France is"].answer == "Paris"
    assert by["The chemical symbol for gold is"].answer == "Au"
    assert by["Japan is a country in the continent of"].answer == "Asia"
    assert by["The official currency of Japan is the"].answer == "Yen"
    assert by["The capital of the U.S. state of Texas is"].answer == "Austin"


def test_offline_seeding(offline: list[Fact]) -> None:
    assert build_offline_facts(seed=0) == offline
    other = build_offline_facts(seed=1)
    # Same facts, different distractors / order.
    assert [(f.prompt, f.answer) for f in other] == [(f.prompt, f.answer) for f in offline]
    assert sum(a.choices != b.choices for a, b in zip(offline, other)) > len(offline) // 2


def test_fact_rejects_answer_outside_choices() -> None:
    with pytest.raises(ValueError):
        Fact(prompt="p", answer="a", choices=("b", "c"), relation="r")


# ----------------------------------------------------------------------------- limit


def test_limit_is_stratified_and_deterministic() -> None:
    small = load_facts("offline", limit=20)
    assert len(small) == 20
    assert set(relation_counts(small)) == set(RELATIONS)
    assert load_facts("offline", limit=20) == small
    assert load_facts("offline", limit=20, seed=1) != small
    assert len(load_facts("offline", limit=5000)) == len(load_facts("offline"))
    assert len(load_facts("offline", limit=3)) == 3
    with pytest.raises(ValueError):
        load_facts("offline", limit=0)


# ----------------------------------------------------------------------------- JSONL


def _write(tmp_path: Path, lines: list[str]) -> Path:
    p = tmp_path / "facts.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


GOOD = json.dumps({"prompt": "The capital of Italy is", "answer": "Rome", "choices": ["Rome", "Oslo"]})


def test_jsonl_loading(tmp_path: Path) -> None:
    p = _write(tmp_path, [
        GOOD,
        "",
        json.dumps({"prompt": "2 + 2 =", "answer": "4", "relation": "math"}),
    ])
    facts = load_facts(str(p))
    assert facts == [
        Fact("The capital of Italy is", "Rome", ("Rome", "Oslo"), "jsonl"),
        Fact("2 + 2 =", "4", ("4",), "math"),
    ]


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        ('{"prompt": "x", "answer": ', "bad JSON"),
        ('["prompt", "answer"]', "expected a JSON object"),
        (json.dumps({"answer": "Rome"}), "missing key 'prompt'"),
        (json.dumps({"prompt": "The capital of Italy is"}), "missing key 'answer'"),
        (json.dumps({"prompt": "The capital of Italy is", "answer": ""}), "'answer' is empty"),
        (json.dumps({"prompt": " ", "answer": "Rome"}), "'prompt' is empty"),
        (json.dumps({"prompt": "p", "answer": "Rome", "choices": ["Oslo", "Paris"]}), "not in choices"),
        (json.dumps({"prompt": "p", "answer": "Rome", "choices": "Rome"}), "list of non-empty strings"),
    ],
)
def test_jsonl_malformed_line(tmp_path: Path, bad_line: str, expected: str) -> None:
    p = _write(tmp_path, [GOOD, GOOD, bad_line])
    with pytest.raises(ValueError) as e:
        load_facts(str(p))
    msg = str(e.value)
    assert f"{p}:3" in msg and expected in msg


def test_jsonl_missing_and_empty(tmp_path: Path) -> None:
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_facts(str(missing))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no facts"):
        load_facts(str(empty))
    with pytest.raises(ValueError, match="unknown fact source"):
        load_facts("trivia")


def test_freebaseqa_fails_fast_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    t0 = time.monotonic()
    with pytest.raises(SourceUnavailableError, match="offline"):
        load_facts("freebaseqa")
    assert time.monotonic() - t0 < 10


# ----------------------------------------------------------------------------- bounds against the model


def test_a_fact_longer_than_the_context_is_refused_by_its_number() -> None:
    from prune_env.data.evaluation import check_fact_lengths
    from prune_env.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    short = Fact("The capital of France is", "Paris", ("Paris", "Rome"), "test")
    long = Fact("The capital of Spain is" + " very" * 300, "Madrid", ("Madrid", "Oslo"), "test")
    source = [short, short, long]
    chosen = [long, short]  # a selection in another order: the message counts in the source's order
    with pytest.raises(ValueError) as error:
        check_fact_lengths(tokenizer, chosen, 256, "tiny-llama", "facts.jsonl", source)
    message = str(error.value)
    assert message.startswith("fact 3 of facts.jsonl (prompt 'The capital of Spain is very very very v'...)")
    n_tokens = (len(tokenizer(long.prompt)["input_ids"])
                + sum(len(tokenizer(" " + c, add_special_tokens=False)["input_ids"]) for c in long.choices))
    assert f"is {n_tokens} tokens with its 2 choice(s)" in message and "(256 tokens)" in message
    check_fact_lengths(tokenizer, chosen, n_tokens, "tiny-llama", "facts.jsonl", source)  # exactly fits
    check_fact_lengths(tokenizer, chosen, None, "tiny-llama", "facts.jsonl", source)  # no context known: no bound


def test_a_long_fact_is_batched_alone_and_the_scores_do_not_change(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fact batches stay under FACT_BATCH_ELEMENTS (rows x width^2); short facts batch exactly as before."""
    from prune_env.data import evaluation
    from prune_env.tiny import tiny_model

    model, tokenizer = tiny_model("llama")
    facts = [Fact(f"Fact number {i} says the capital is", "Paris", ("Paris", "Rome", "Oslo"), "test")
             for i in range(5)] + [Fact("A long fact" + " again" * 60, "Rome", ("Rome", "Paris"), "test")]
    normal = evaluation.fact_batches(tokenizer, facts, batch_size=4)
    assert [b.input_ids.shape[0] for b in normal] == [4, 2]
    reference = evaluation.evaluate_facts(model, tokenizer, facts, batch_size=4)
    width = normal[-1].input_ids.shape[1]
    monkeypatch.setattr(evaluation, "FACT_BATCH_ELEMENTS", width ** 2)  # room for one long row per batch
    capped = evaluation.fact_batches(tokenizer, facts, batch_size=4)
    assert [b.input_ids.shape[0] for b in capped] == [4, 1, 1]
    assert all(b.input_ids.shape[0] * b.input_ids.shape[1] ** 2 <= width ** 2 or b.input_ids.shape[0] == 1
               for b in capped)
    again = evaluation.evaluate_facts(model, tokenizer, facts, batch_size=4)
    assert again.correct == reference.correct and again.greedy_exact == reference.greedy_exact
    assert again.nll == pytest.approx(reference.nll, rel=1e-5)

def test_offline_balanced_caps_answers_and_adds_unique_relations() -> None:
    """The "offline-balanced" facts: no answer covers more than 3 facts of a relation, the added relations never repeat an
    answer, 3 same-relation distractors, and the seed changes distractors only; "offline" is unchanged."""
    from collections import Counter

    from prune_env.data.facts import BALANCED_RELATIONS, MAX_PER_ANSWER, UNIQUE_RELATIONS

    facts = load_facts("offline-balanced")
    assert [r for r in BALANCED_RELATIONS if r in {f.relation for f in facts}] == list(BALANCED_RELATIONS)
    counts = Counter((f.relation, f.answer) for f in facts)
    assert max(counts.values()) == MAX_PER_ANSWER == 3
    assert all(counts[(f.relation, f.answer)] == 1 for f in facts if f.relation in UNIQUE_RELATIONS)
    pools = {r: {f.answer for f in facts if f.relation == r} for r in BALANCED_RELATIONS}
    assert all(len(f.choices) == 4 and set(f.choices) <= pools[f.relation] for f in facts)
    assert sum(f.relation == "country_continent" for f in facts) == 21  # 7 continents x 3
    other = load_facts("offline-balanced", seed=1)
    assert [(f.prompt, f.answer) for f in other] == [(f.prompt, f.answer) for f in facts]
    assert [f.choices for f in other] != [f.choices for f in facts]
    assert load_facts("offline-balanced") == facts
    offline = load_facts("offline")
    assert len(offline) == 917 and {f.relation for f in offline} == set(BALANCED_RELATIONS) - set(UNIQUE_RELATIONS)
