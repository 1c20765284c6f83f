"""Paired bootstrap intervals against uniform: per-window / per-fact data in the records, exact
zero-width intervals for an agent against itself, a clearly worse agent flagged, determinism, old records."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from prune_bench.config import BenchmarkConfig, defaults
from prune_bench.driver import run_benchmark
from prune_bench.intervals import paired_bootstrap
from prune_bench.report import OLD_RECORD, compare, write_report
from prune_env.config import merge
from prune_env.data import tokenize_corpus
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
