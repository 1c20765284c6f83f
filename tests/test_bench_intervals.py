"""Paired bootstrap intervals against uniform: per-window / per-fact data in the records, exact
zero-width intervals for an agent against itself, a clearly worse agent flagged, determinism, old records."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from prune_bench.bench_config import BenchmarkConfig, defaults
from prune_bench.driver import run_benchmark
from prune_bench.intervals import paired_bootstrap
from prune_bench.report import OLD_RECORD, compare, write_report
from prune_bench.store import ResultsError, validate_results
from prune_env.config_files import merge
from prune_env.data.windows import tokenize_corpus
from prune_env.data.facts import RELATIONS, Fact
from prune_env.data.knowledge import balanced_retention
from prune_env.tiny import tiny_model


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory, text_file):
    """tiny-llama after 60 AdamW steps on the test text, saved as a model folder: a random model's
    perplexity is the vocabulary size whatever is pruned, a slightly trained one is hurt by bad pruning."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, tokenizer = tiny_model("llama")
    ids = tokenize_corpus(text_file.read_text(), tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(60):
        starts = torch.randint(0, 5000 - 65, (8,), generator=generator)
        batch = torch.stack([ids[s:s + 64] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    folder = tmp_path_factory.mktemp("trained-tiny") / "model"
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    yield folder
    torch.set_num_threads(old_threads)


@pytest.fixture(scope="module")
def grid(trained_tiny, text_file, tmp_path_factory):
    base = {"model": str(trained_tiny), "device": "cpu", "threads": 1, "targets": [0.6], "seeds": [0],
            "agents": [{"name": "uniform"}, {"name": "uniform", "label": "uniform-again"},
                       {"name": "random", "high": 0.99}],
            "data": {"text": str(text_file), "calib_samples": 4, "calib_seq_len": 32, "eval_tokens": 256,
                     "eval_seq_len": 64, "n_facts": 20, "grad_samples": 2},
            "heldout": {"eval_tokens": 512, "eval_seq_len": 64, "n_facts": 40},
            "out": str(tmp_path_factory.mktemp("intervals") / "out")}
    config = BenchmarkConfig.from_dict(merge(defaults(), base))
    data = run_benchmark(config)
    return config, data, {r["agent"]: r for r in data["records"]}


def test_records_hold_what_the_intervals_resample(grid):
    _, data, records = grid
    for rec in records.values():
        windows, facts = rec["per_window"], rec["per_fact"]
        assert len(windows["nll"]) == data["data"]["text"]["evaluation"]["windows"] == 8
        assert windows["tokens"] == [63] * 8
        assert math.exp(sum(windows["nll"]) / sum(windows["tokens"])) == pytest.approx(rec["ppl"], rel=1e-12)
        assert len(facts["correct"]) == len(facts["greedy_exact"]) == data["data"]["facts"]["n"] == 40
        assert sum(facts["correct"]) / 40 == rec["fact_acc"]
    assert len(data["dense_per_fact"]["greedy_exact"]) == 40


def test_agent_against_itself_is_exactly_zero_width(grid):
    config, data, records = grid
    assert records["uniform-again"]["per_window"] == records["uniform"]["per_window"]
    result = compare(data, [records["uniform-again"]], [records["uniform"]])
    assert (result.ppl_ratio.low, result.ppl_ratio.estimate, result.ppl_ratio.high) == (1.0, 1.0, 1.0)
    assert (result.acc_diff.low, result.acc_diff.estimate, result.acc_diff.high) == (0.0, 0.0, 0.0)
    assert result.ppl_ratio.verdict == result.acc_diff.verdict == "tie"
    report = (config.out_dir / "report.md").read_text()
    assert "| uniform-again | 1.0000 [1.0000, 1.0000] | 0.000 [0.000, 0.000] |" in report


def test_clearly_worse_agent_gets_an_interval_that_excludes_no_difference(grid):
    config, data, records = grid
    assert max(records["random"]["allocation"]) > 0.9  # one block nearly removed
    worse = compare(data, [records["random"]], [records["uniform"]])
    assert worse.ppl_ratio.low > 1.0 and worse.ppl_ratio.verdict == "worse"
    flipped = paired_bootstrap([records["uniform"]], [records["random"]])  # uniform measured against random
    assert flipped.ppl_ratio.high < 1.0 and flipped.ppl_ratio.verdict == "beats"
    row = next(line for line in (config.out_dir / "report.md").read_text().splitlines()
               if line.startswith("| random |") and "[" in line)
    assert " worse |" in row and "beats" not in row


def test_bootstrap_is_deterministic_for_a_fixed_seed(grid):
    _, data, records = grid
    first = paired_bootstrap([records["random"]], [records["uniform"]], seed=0)
    assert paired_bootstrap([records["random"]], [records["uniform"]], seed=0) == first
    other = paired_bootstrap([records["random"]], [records["uniform"]], seed=1)
    assert (other.ppl_ratio.low, other.ppl_ratio.high) != (first.ppl_ratio.low, first.ppl_ratio.high)
    assert other.ppl_ratio.estimate == first.ppl_ratio.estimate  # the point estimate uses all the data


def test_retention_interval_resamples_the_facts_dense_answers():
    dense = [True] * 30 + [False] * 10
    keeps = {"per_window": {"nll": [10.0] * 4, "tokens": [9] * 4},
             "per_fact": {"correct": [True] * 40, "greedy_exact": [True] * 30 + [False] * 10}}
    loses = copy.deepcopy(keeps)
    loses["per_fact"]["greedy_exact"] = [False] * 40
    result = paired_bootstrap([loses], [keeps], dense)
    assert result.retention_diff.estimate == -1.0 and result.retention_diff.verdict == "worse"
    assert paired_bootstrap([keeps], [keeps], dense).retention_diff.high == 0.0
    assert paired_bootstrap([keeps], [keeps], [False] * 40).retention_diff is None  # nothing to retain


def test_old_records_get_no_interval(grid, tmp_path):
    _, data, _ = grid
    old = copy.deepcopy(data)
    for rec in old["records"]:
        rec.pop("per_window")
        rec.pop("per_fact")
    old.pop("dense_per_fact")
    report = write_report(old, tmp_path).read_text()
    assert f"| random | {OLD_RECORD} |" in report and f"| uniform-again | {OLD_RECORD} |" in report


def test_records_and_header_carry_the_balanced_metric(grid):
    config, data, records = grid
    labels = data["dense_per_fact"]
    assert len(labels["relation"]) == len(labels["answer"]) == 40 and set(labels["relation"]) <= set(RELATIONS)
    assert set(data["knowledge_baseline"]) == {"answers", "fact_retention", "fact_retention_balanced",
                                               "retention_by_relation", "plain_by_relation"}
    for rec in records.values():
        assert 0.0 <= rec["fact_retention_balanced"] <= 1.0 and 0.0 <= rec["fact_acc_balanced"] <= 1.0
        assert isinstance(rec["retention_by_relation"], dict)
        assert rec["fact_answer_ppl_balanced"] > 1.0 and len(rec["per_fact"]["answer_nll"]) == 40
    report = (config.out_dir / "report.md").read_text()
    assert "| balanced retention (majority baseline " in report and "balanced retention diff |" in report
    assert "| balanced acc | answer ppl |" in report
    validate_results(data)
    bad = copy.deepcopy(data)
    bad["records"][0]["fact_retention_balanced"] = 1.5
    bad["records"][1]["fact_answer_ppl_balanced"] = 0.0
    bad["records"][2]["per_fact"]["answer_nll"] = [1.0] * 39
    bad["dense_per_fact"]["answer"] = bad["dense_per_fact"]["answer"][:3]
    with pytest.raises(ResultsError) as error:
        validate_results(bad)
    assert "'fact_retention_balanced' must be a number in [0, 1]" in str(error.value)
    assert "'fact_answer_ppl_balanced' must be a positive number or null, got 0.0" in str(error.value)
    assert "per_fact.answer_nll has 39 entries but there are 40 held-out facts" in str(error.value)
    assert "dense_per_fact.answer has 3 entries but there are 40 held-out facts" in str(error.value)


def test_files_without_the_balanced_metric_still_load_and_report(grid, tmp_path):
    _, data, _ = grid
    old = copy.deepcopy(data)
    for rec in old["records"]:
        for key in ("fact_retention_balanced", "fact_acc_balanced", "retention_by_relation"):
            rec.pop(key)
    old["dense_per_fact"] = {"greedy_exact": old["dense_per_fact"]["greedy_exact"]}
    old.pop("knowledge_baseline")
    validate_results(old)
    report = write_report(old, tmp_path).read_text()
    assert "majority baseline -" in report and "knowledge:" not in report


def test_report_shows_balanced_retention_per_relation_beside_the_majority_baseline(grid, tmp_path):
    _, data, _ = grid
    shown = copy.deepcopy(data)
    shown["knowledge_baseline"].update(fact_retention_balanced=0.25, fact_retention=0.5,
                                       retention_by_relation={"test": 0.25})
    for rec in shown["records"]:
        rec["retention_by_relation"] = {"test": 0.75}
    report = write_report(shown, tmp_path).read_text()
    assert "| balanced retention (majority baseline 0.250) |" in report
    assert "balanced 0.250, plain 0.500" in report
    assert "| agent | test (0.250) |" in report and "| uniform | 0.750 ± 0.000 |" in report


def test_balanced_interval_sees_what_plain_retention_misses():
    """Two agents keep 20 of the 40 known facts: one only the 20 'Africa' facts (the majority answer), the other
    one fact of every other answer. Plain retention cannot tell them apart; the balanced interval can."""
    relations = ["continent"] * 30 + ["symbol"] * 10
    answers = ["Africa"] * 20 + [f"c{i}" for i in range(10)] + [f"s{i}" for i in range(10)]
    dense = [True] * 40
    window = {"nll": [10.0] * 4, "tokens": [9] * 4}
    gamer = {"per_window": window, "per_fact": {"correct": [True] * 40, "greedy_exact": [True] * 20 + [False] * 20}}
    diverse = {"per_window": window, "per_fact": {"correct": [True] * 40, "greedy_exact": [False] * 20 + [True] * 20}}
    result = paired_bootstrap([gamer], [diverse], dense, labels=(relations, answers))
    assert result.retention_diff.estimate == 0.0
    facts = [Fact(f"q{i}", a, (a,), r) for i, (r, a) in enumerate(zip(relations, answers))]
    expected = balanced_retention(facts, dense, gamer["per_fact"]["greedy_exact"])[0] - \
        balanced_retention(facts, dense, diverse["per_fact"]["greedy_exact"])[0]
    assert expected == pytest.approx(1 / 22 - (10 / 11 + 1) / 2)
    assert result.balanced_retention_diff.estimate == pytest.approx(expected, abs=1e-12)
    assert result.balanced_retention_diff.verdict == "worse"
    itself = paired_bootstrap([gamer], [gamer], dense, labels=(relations, answers)).balanced_retention_diff
    assert (itself.low, itself.estimate, itself.high) == (0.0, 0.0, 0.0)
    assert paired_bootstrap([gamer], [diverse], dense).balanced_retention_diff is None  # no labels, no interval
    with pytest.raises(ValueError, match="labels name 39 facts"):
        paired_bootstrap([gamer], [diverse], dense, labels=(relations[:-1], answers[:-1]))


def test_answer_ppl_interval_is_the_balanced_ratio_and_needs_the_per_fact_nll():
    """The answer-perplexity ratio: exp of the balanced mean NLL gap, a frequent answer counting once."""
    relations = ["continent"] * 30 + ["symbol"] * 10
    answers = ["Africa"] * 20 + [f"c{i}" for i in range(10)] + [f"s{i}" for i in range(10)]
    window = {"nll": [10.0] * 4, "tokens": [9] * 4}
    flags = {"correct": [True] * 40, "greedy_exact": [True] * 40}
    base = {"per_window": window, "per_fact": {**flags, "answer_nll": [1.0] * 40}}
    # one nat worse on the 20 Africa facts: one answer group of 11 in continent, so the balanced gap is (1/11) / 2
    frequent = {"per_window": window, "per_fact": {**flags, "answer_nll": [2.0] * 20 + [1.0] * 20}}
    result = paired_bootstrap([frequent], [base], [True] * 40, labels=(relations, answers))
    assert result.answer_ppl_ratio.estimate == pytest.approx(math.exp(1 / 22))
    assert result.answer_ppl_ratio.lower_is_better and result.answer_ppl_ratio.null == 1.0
    everywhere = {"per_window": window, "per_fact": {**flags, "answer_nll": [2.0] * 40}}
    worse = paired_bootstrap([everywhere], [base], [True] * 40, labels=(relations, answers)).answer_ppl_ratio
    assert worse.estimate == pytest.approx(math.e) and worse.low == pytest.approx(math.e) and worse.verdict == "worse"
    old = {"per_window": window, "per_fact": flags}  # written before answer NLLs were kept
    assert paired_bootstrap([old], [base], [True] * 40, labels=(relations, answers)).answer_ppl_ratio is None
