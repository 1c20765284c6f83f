"""The surrogate reward: its data-set builder (writes, resumes, survives a kill, records per-fact
knowledge) and its fit (ranks unseen allocations of a known additive structure, predicts balanced knowledge
where the records carry it, refuses another model's env, is deterministic); its command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from prune_env.surrogate import (Dataset, SurrogateMismatchError, append_record, cross_validated, fit,
                                 load_surrogate, read_dataset, start_dataset)
from prune_env.surrogate.commands import build as builder
from prune_env.surrogate.commands import visited

# --------------------------------------------------------------------------- synthetic data sets

DENSE = {"ppl": 20.0, "fact_acc": 0.8, "fact_nll": 1.0, "fact_retention": 1.0}
REWARD = {"ppl_weight": 1.0, "fact_weight": 1.0, "shaping_weight": 0.0, "rollback_penalty": 0.1}
CONTEXT = {"model": "synthetic", "dtype": "float32", "granularity": "block", "method": "wanda", "pattern": None,
           "units": 8, "text": {"source": "a"}, "facts": {"source": "b", "n": 10, "offset": 0}}


def synthetic(n_records: int = 160, n_units: int = 8, seed: int = 0) -> Dataset:
    """Allocations at four targets whose log-ppl ratio is a known sum of convex per-unit costs (units
    differ in sensitivity) and whose fact accuracy falls linearly with a weighted sparsity."""
    rng = np.random.default_rng(seed)
    sensitivity = np.linspace(0.5, 3.0, n_units)
    records = []
    for draw in range(n_records):
        target = (0.3, 0.4, 0.5, 0.6)[draw % 4]
        s = np.clip(target + rng.normal(0.0, 0.12, n_units), 0.0, 0.9)
        s = np.clip(s - s.mean() + target, 0.0, 0.9)
        log_ratio = float(np.sum(sensitivity * s ** 3))
        acc = float(DENSE["fact_acc"] - 0.1 * np.dot(sensitivity, s) / n_units)
        records.append({"draw": draw, "target": target, "allocation": s.tolist(), "ppl": DENSE["ppl"] * np.exp(log_ratio),
                        "fact_acc": acc, "fact_nll": 1.0 + log_ratio, "fact_retention": acc / DENSE["fact_acc"],
                        "quality": -log_ratio - (DENSE["fact_acc"] - acc)})
    profile = {"z_wanda": rng.normal(0.0, 1.0, n_units).tolist(), "z_grad": rng.normal(0.0, 1.0, n_units).tolist()}
    header = {"format": "prune-gym-surrogate", "version": 1, "context": CONTEXT, "dense": DENSE, "reward": REWARD,
              "unit_numel": [100] * n_units, "profile": profile}
    return Dataset(header, records)


def write(dataset: Dataset, path: Path) -> Path:
    path.write_text("\n".join(json.dumps(line) for line in [dataset.header, *dataset.records]) + "\n")
    return path


def test_fit_ranks_unseen_allocations_of_a_known_additive_structure():
    data = synthetic()
    train = [r for r in data.records if r["draw"] < 120]
    test = [r for r in data.records if r["draw"] >= 120]
    model = fit(data, records=train)
    predicted = [model.predict(r["allocation"], r["target"]) for r in test]
    exact_q = [r["quality"] for r in test]
    predicted_q = [-np.log(p["ppl"] / DENSE["ppl"]) - (DENSE["fact_acc"] - p["fact_acc"]) for p in predicted]
    assert spearmanr(exact_q, predicted_q).statistic > 0.95
    for t in (0.3, 0.4, 0.5, 0.6):  # within one target too, where only the shape of the allocation matters
        pick = [i for i, r in enumerate(test) if r["target"] == t]
        assert spearmanr([exact_q[i] for i in pick], [predicted_q[i] for i in pick]).statistic > 0.8
    figures = cross_validated(data, folds=5)
    assert figures["spearman"] > 0.95 and abs(figures["bias"]) < 0.05
    assert len(figures["predicted"]) == len(data.records)
    retention = figures["metrics"]["fact_retention"]
    assert min(retention["spearman_per_target"].values()) > 0.8  # retention falls with weighted sparsity
    assert retention["mae"] < 0.05
    assert figures["metrics"]["log_ppl"]["spearman"] > 0.95 and abs(figures["metrics"]["log_ppl"]["bias"]) < 0.05
    assert "fact_retention_balanced" not in figures["metrics"]  # these records carry no balanced knowledge


def test_fit_does_not_rank_noise():
    """The k-fold figure is a real test: on rewards unrelated to the allocation it is near zero."""
    data = synthetic()
    rng = np.random.default_rng(1)
    for record in data.records:
        record["ppl"] = DENSE["ppl"] * float(np.exp(rng.normal(0.0, 0.3)))
        record["quality"] = -float(np.log(record["ppl"] / DENSE["ppl"])) - (DENSE["fact_acc"] - record["fact_acc"])
        record["fact_retention"] = float(rng.uniform(0.0, 1.0))
    figures = cross_validated(data, folds=5)
    assert np.mean([abs(v) for v in figures["spearman_per_target"].values()]) < 0.5
    assert np.mean([abs(v) for v in figures["metrics"]["fact_retention"]["spearman_per_target"].values()]) < 0.5


def test_load_refuses_another_model_and_predicts_deterministically(tmp_path):
    path = write(synthetic(), tmp_path / "set.jsonl")
    surrogate = load_surrogate(path, CONTEXT)
    allocation = synthetic().records[0]["allocation"]
    first = surrogate.predict(allocation, 0.3)
    assert first == surrogate.predict(allocation, 0.3)
    assert first == load_surrogate(path, dict(CONTEXT)).predict(allocation, 0.3)
    assert set(first) == {"ppl", "fact_acc", "fact_nll", "fact_retention"}
    with pytest.raises(SurrogateMismatchError, match=r"model=\"synthetic\".*model=\"tiny-llama\".*prune_env.surrogate build"):
        load_surrogate(path, {**CONTEXT, "model": "tiny-llama"})
    with pytest.raises(SurrogateMismatchError, match="facts"):
        load_surrogate(path, {**CONTEXT, "facts": {"source": "b", "n": 10, "offset": 200}})
    with pytest.raises(ValueError, match="not target_sparsity 0.5"):
        surrogate.predict(allocation, 0.5)
    with pytest.raises(ValueError, match="8 finite ratios"):
        surrogate.predict(allocation[:-1])


def test_append_survives_a_write_cut_short(tmp_path):
    path = tmp_path / "set.jsonl"
    start_dataset(path, {"context": CONTEXT, "plan": {"seed": 0}})
    append_record(path, {"draw": 0})
    with open(path, "ab") as handle:  # what a kill in the middle of a write leaves behind
        handle.write(b'{"draw": 1, "allocat')
    assert [r["draw"] for r in read_dataset(path).records] == [0]
    append_record(path, {"draw": 1})
    assert [r["draw"] for r in read_dataset(path).records] == [0, 1]
    assert path.read_text().endswith("}\n") and path.read_text().count("\n") == 3
    with pytest.raises(ValueError, match="different plan"):
        start_dataset(path, {"context": CONTEXT, "plan": {"seed": 1}})


def test_builder_writes_resumes_and_never_duplicates(tmp_path, tiny_data):
    path = tmp_path / "tiny.jsonl"
    assert builder.build("tiny-llama", path, 0, 0, tiny_data, log=lambda m: None) == 4  # round 0: uniform
    with open(path, "ab") as handle:
        handle.write(b'{"draw": 4, "tar')  # killed mid-append
    assert builder.build("tiny-llama", path, 1, 0, tiny_data, log=lambda m: None) == 16
    data = read_dataset(path)
    draws = [r["draw"] for r in data.records]
    assert draws == list(range(20))
    assert builder.build("tiny-llama", path, 1, 0, tiny_data, log=lambda m: None) == 0
    assert {(r["kind"], r["target"]) for r in data.records} == {
        (k, t) for k in ("uniform", "near", "random", "structured", "smooth") for t in (0.3, 0.4, 0.5, 0.6)}
    numel = np.asarray(data.header["unit_numel"], dtype=float)
    for record in data.records:
        assert abs(np.dot(record["allocation"], numel) / numel.sum() - record["target"]) < 1e-3
        assert record["quality"] == pytest.approx(
            -np.log(record["ppl"] / data.header["dense"]["ppl"])
            - (data.header["dense"]["fact_acc"] - record["fact_acc"]))
    assert data.header["model_file"] == {"spec": "tiny-llama"} and data.header["context"]["model"] == "tiny-llama"
    again = tmp_path / "again.jsonl"  # same seed, same plan: the same allocations and numbers
    builder.build("tiny-llama", again, 0, 0, tiny_data, log=lambda m: None)
    assert [r["ppl"] for r in read_dataset(again).records] == [r["ppl"] for r in data.records[:4]]
    with pytest.raises(ValueError, match="different plan"):
        builder.build("tiny-llama", path, 1, 7, tiny_data, log=lambda m: None)


def test_every_draw_kind_is_budget_matched_and_reproducible(tiny_data):
    from prune_env.context import DataConfig, PruningContext

    profile = builder.Profile(PruningContext("tiny-llama", data=DataConfig.from_dict(tiny_data)))
    draws = builder.plan(len(builder.STRUCTURED))
    assert {d["variant"] for d in draws if d["kind"] == "structured"} == set(builder.STRUCTURED)
    numel = np.asarray(profile.numel, dtype=float)
    for draw in draws:
        ratios, params = builder.allocation(draw, 0, profile)
        assert np.dot(ratios, numel) / numel.sum() == pytest.approx(draw["target"], abs=1e-9)
        assert min(ratios) >= builder.LOW and max(ratios) <= builder.HIGH
        assert (ratios, params) == builder.allocation(draw, 0, profile)
    flat = [(d["kind"], d["variant"]) for d in draws
            if d["kind"] != "uniform" and np.std(builder.allocation(d, 0, profile)[0]) == 0]
    assert not flat, f"draws equal to the uniform allocation: {flat}"


def test_a_data_set_from_before_a_reward_option_existed_resumes(tmp_path):
    """A header written before RewardConfig had `terms` describes the same reward: the build resumes."""
    from prune_env.surrogate import read_dataset, start_dataset

    header = {"context": {"model": "m"}, "model_file": {}, "dense": {"ppl": 1.0}, "plan": {}, "env": {},
              "reward": {"ppl_weight": 1.0, "fact_weight": 1.0, "shaping_weight": 0.0, "rollback_penalty": 0.1}}
    path = tmp_path / "data.jsonl"
    start_dataset(path, header)
    now = {**header, "reward": {**header["reward"], "terms": {}}}
    assert start_dataset(path, now).records == read_dataset(path).records == []
    with pytest.raises(ValueError, match="different reward"):
        start_dataset(path, {**header, "reward": {**header["reward"], "fact_weight": 2.0}})


def test_spread_calibration_finds_the_round_the_fit_was_optimistic_about(tmp_path):
    """python -m prune_env.surrogate visited --calibration: each re-anchoring round is predicted by the fit on the
    rest; a round whose exact rewards fall below the structure the fit learned shows up as positive z."""
    data = synthetic(n_records=200)
    for record in data.records[-24:]:  # two rounds of 12 policy-visited records
        honest = record["draw"] % 2 == 0
        record.update(kind="visited", params={"policy": "honest" if honest else "optimistic-about"})
        if not honest:  # the exact model lost 20 % more perplexity than the structure says
            record["ppl"] *= 1.2
            record["quality"] -= float(np.log(1.2))
    calibration = visited.spread_calibration(write(data, tmp_path / "d.jsonl"))
    rounds = calibration["rounds"]
    assert set(rounds) == {"honest", "optimistic-about"} and calibration["records"] == 24
    assert rounds["optimistic-about"]["bias"] > 0.1 > abs(rounds["honest"]["bias"])
    assert rounds["optimistic-about"]["mean_z"] > rounds["honest"]["mean_z"]
    covered = [calibration["covered"][k] for k in ("1.0", "2.0", "3.0")]
    assert covered == sorted(covered) and covered[0] < 1.0  # more pessimism covers more, one spread not all


def test_spread_calibration_needs_a_reanchoring_round(tmp_path):
    with pytest.raises(ValueError, match="no re-anchoring round"):
        visited.spread_calibration(write(synthetic(), tmp_path / "d.jsonl"))


# --------------------------------------------------------------------------- issue #24: the data set is checked


def _edit(path: Path, line: int, change) -> Path:
    """Line `line` (1 = header) of a data set file replaced by change(parsed line) (a dict or raw text)."""
    lines = path.read_text().splitlines()
    new = change(json.loads(lines[line - 1]))
    lines[line - 1] = new if isinstance(new, str) else json.dumps(new)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("line, change, message", [
    (3, lambda r: {**r, "ppl": float("nan")}, "field 'ppl' is NaN"),
    (3, lambda r: {k: v for k, v in r.items() if k != "ppl"}, "field 'ppl' is missing"),
    (4, lambda r: {**r, "fact_acc": float("inf")}, "field 'fact_acc' is Infinity, not a finite number"),
    (5, lambda r: {**r, "fact_nll": "1.0"}, "field 'fact_nll' is \"1.0\", not a finite number"),
    (2, lambda r: {**r, "allocation": r["allocation"][:-1]}, "field 'allocation' is ["),
    (2, lambda r: {**r, "allocation": [*r["allocation"][:-1], float("nan")]}, "field 'allocation[7]' is NaN"),
    (2, lambda r: {**r, "allocation": [1.5] * 8}, "not ratios in [0, 1]"),
    (6, lambda r: {**r, "draw": -1}, "field 'draw' is -1"),
    (6, lambda r: {**r, "quality": None}, "field 'quality' is missing"),
    (7, lambda r: '{"draw": 5, "allocation": [0.1,', "not JSON"),
    (7, lambda r: "[1, 2]", "a list, not a JSON object"),
    (1, lambda h: {**h, "unit_numel": [100] * 7 + [-1]}, "field 'unit_numel[7]' is -1"),
    (1, lambda h: {**h, "dense": {**h["dense"], "ppl": float("nan")}}, "field 'dense.ppl' is NaN"),
    (1, lambda h: {k: v for k, v in h.items() if k != "dense"}, "field 'dense' is missing"),
    (1, lambda h: {**h, "context": "synthetic"}, "field 'context' is \"synthetic\""),
    (1, lambda h: {**h, "profile": {"z_wanda": [0.0] * 8, "z_grad": [0.0] * 3}}, "field 'profile.z_grad'"),
])
def test_bad_lines_are_refused_naming_the_file_and_line(tmp_path, line, change, message):
    """A data set with NaN was trained on (then crashed with a tensor dump); a missing field was a KeyError."""
    path = _edit(write(synthetic(n_records=12), tmp_path / "set.jsonl"), line, change)
    with pytest.raises(ValueError) as error:
        load_surrogate(path, CONTEXT)
    assert type(error.value).__name__ == "SurrogateDataError"
    text = str(error.value)
    assert text.startswith(f"{path}:{line}: ") and message in text and "\n" not in text


def test_a_header_without_unit_sizes_cannot_carry_allocations(tmp_path):
    path = _edit(write(synthetic(n_records=4), tmp_path / "set.jsonl"), 1,
                 lambda h: {k: v for k, v in h.items() if k != "unit_numel"})
    with pytest.raises(ValueError, match=f"{path}:2: a record with an allocation, but the header has no 'unit_numel'"):
        read_dataset(path)


def test_binary_data_set_and_nan_records_to_append_are_refused(tmp_path):
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage\n")
    with pytest.raises(ValueError, match=f"{binary}: not UTF-8 text"):
        read_dataset(binary)
    path = write(synthetic(n_records=4), tmp_path / "set.jsonl")
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"\(new record\): field 'ppl' is NaN"):
        append_record(path, {"draw": 4, "ppl": float("nan")})
    assert path.read_bytes() == before


def test_the_packaged_data_set_reads_unchanged():
    from prune_env.surrogate import PACKAGED

    lines = PACKAGED.read_text().splitlines()
    data = read_dataset(PACKAGED)
    assert data.header == json.loads(lines[0]) and data.records == [json.loads(line) for line in lines[1:]]
    assert len(data.records) == len(lines) - 1 > 800


# --------------------------------------------------------------------------- issue #26: records that carry knowledge


def with_knowledge(data: Dataset, n_facts: int = 24, seed: int = 0) -> Dataset:
    """`data` with per-fact flags and balanced knowledge on every record: each fact is kept while the
    sparsity of 'its' unit stays below a threshold, so balanced retention has a known shape (it falls with
    the sparsity of the units that hold knowledge, not with the budget alone)."""
    from prune_env.surrogate import knowledge_of, pack_flags

    rng = np.random.default_rng(seed)
    n_units = len(data.header["unit_numel"])
    labels = [[f"r{i % 3}", f"a{i % 5}"] for i in range(n_facts)]
    home, limit = rng.integers(0, n_units, n_facts), rng.uniform(0.3, 0.7, n_facts)
    correct_dense = rng.random(n_facts) < 0.8
    data.header["fact_set"] = {"labels": labels, "fact_greedy_exact": pack_flags([True] * n_facts),
                               "fact_correct": pack_flags(correct_dense)}
    for record in data.records:
        s = np.asarray(record["allocation"])
        kept = s[home] < limit
        record.update(fact_greedy_exact=pack_flags(kept), fact_correct=pack_flags(kept & correct_dense))
        record.update(knowledge_of(data.header, record))
    return data


def test_flags_pack_exactly_and_recompute_the_env_s_balanced_metrics():
    from prune_env.data.facts import Fact
    from prune_env.data.knowledge import balanced_accuracy, balanced_retention
    from prune_env.surrogate import knowledge_of, pack_flags, unpack_flags

    rng = np.random.default_rng(3)
    flags = rng.random(37) < 0.5
    assert pack_flags(flags) == pack_flags(list(flags)) and len(pack_flags(flags)) == 10
    assert unpack_flags(pack_flags(flags), 37).tolist() == flags.tolist()
    facts = [Fact(f"p{i}", f"a{i % 4}", (f"a{i % 4}", "x"), f"r{i % 3}") for i in range(37)]
    dense, pruned, correct = rng.random(37) < 0.7, rng.random(37) < 0.4, rng.random(37) < 0.5
    header = {"fact_set": {"labels": [[f.relation, f.answer] for f in facts], "fact_greedy_exact": pack_flags(dense),
                           "fact_correct": pack_flags(dense)}}
    got = knowledge_of(header, {"fact_greedy_exact": pack_flags(pruned), "fact_correct": pack_flags(correct)})
    assert got["fact_retention_balanced"] == balanced_retention(facts, dense.tolist(), pruned.tolist())[0]
    assert got["fact_acc_balanced"] == balanced_accuracy(facts, correct.tolist())


def test_a_fit_on_records_with_knowledge_predicts_it():
    data = with_knowledge(synthetic(n_records=200))
    figures = cross_validated(data, folds=5)
    balanced = figures["metrics"]["fact_retention_balanced"]
    assert balanced["spearman"] > 0.8 and abs(balanced["bias"]) < 0.03
    assert np.mean(list(balanced["spearman_per_target"].values())) > 0.6  # the shape, not only the budget
    assert "fact_acc_balanced" in figures["metrics"]
    model = fit(data, records=data.records[:160])
    assert model.knows
    test = data.records[160:]
    predicted = [model.predict(r["allocation"])["fact_retention_balanced"] for r in test]
    assert spearmanr(predicted, [r["fact_retention_balanced"] for r in test]).statistic > 0.8
    shuffled = with_knowledge(synthetic(n_records=200))  # the same flags on other allocations: no structure
    rng = np.random.default_rng(5)
    values = [r["fact_retention_balanced"] for r in shuffled.records]
    for record, value in zip(shuffled.records, rng.permutation(values)):
        record["fact_retention_balanced"] = float(value)
    assert cross_validated(shuffled)["metrics"]["fact_retention_balanced"]["spearman"] < 0.3


def test_the_answer_perplexity_is_fitted_on_the_records_that_carry_it_by_its_log():
    """Records built before the answer perplexity existed keep the other knowledge metrics; the ones built
    after it teach the fit the answer perplexity, which is regressed by its log and predicted positive."""
    data = with_knowledge(synthetic(n_records=200))
    for record in data.records[100:]:  # the newer half carries it: exp of a shape the allocation sets
        s = np.asarray(record["allocation"])
        record["fact_answer_ppl_balanced"] = float(np.exp(1.0 + 3.0 * s[-3:].mean() + 0.5 * s[:3].mean()))
    model = fit(data)
    assert model.knows and model.targets[-3:] == ("fact_retention_balanced", "fact_acc_balanced",
                                                  "fact_answer_ppl_balanced")
    figures = cross_validated(data, folds=5)["metrics"]["log_fact_answer_ppl_balanced"]  # compared in log
    assert figures["n"] == 100 and figures["spearman"] > 0.9
    allocations = [r["allocation"] for r in data.records[:20]]
    predicted = model.predict_many(allocations)["fact_answer_ppl_balanced"]
    assert (predicted > 0).all() and "fact_acc_balanced" in model.predict(allocations[0])
    for record in data.records[102:]:  # two carry it: too few, the other knowledge metrics stay
        record.pop("fact_answer_ppl_balanced")
    assert fit(data).targets[-2:] == ("fact_retention_balanced", "fact_acc_balanced")


def test_with_knowledge_in_too_few_records_the_balanced_metrics_are_absent_and_fail_clearly(tmp_path):
    from prune_env.surrogate import MissingKnowledgeError

    data = with_knowledge(synthetic(n_records=40))
    for record in data.records[2:]:  # two records with knowledge: too few to fit it on
        for key in ("fact_retention_balanced", "fact_acc_balanced", "fact_greedy_exact", "fact_correct"):
            record.pop(key)
    path = write(data, tmp_path / "mixed.jsonl")
    surrogate = load_surrogate(path, CONTEXT)
    assert not surrogate.knows
    metrics = surrogate.predict(data.records[5]["allocation"])
    assert "fact_retention_balanced" not in metrics and metrics["fact_acc"] >= 0.0
    with pytest.raises(MissingKnowledgeError, match=rf"fact_retention_balanced is not predicted: the surrogate "
                                                    rf"data set '{path}' has no record with it.*rebuild"):
        metrics["fact_retention_balanced"]
    with pytest.raises(KeyError):
        metrics["no_such_metric"]


def test_each_metric_is_fitted_on_the_records_that_carry_it():
    """Knowledge on a subset: the fit's knowledge columns ignore the records without it (their values would
    otherwise have to be invented): adding records without knowledge ranks unseen allocations' knowledge as
    well as the fit on the knowledge records alone (they differ only in the shared feature scaling)."""
    data = with_knowledge(synthetic(n_records=200))
    subset = Dataset(data.header, data.records[:60])
    mixed = Dataset(data.header, [dict(r) for r in data.records])
    for record in mixed.records[60:]:
        for key in ("fact_retention_balanced", "fact_acc_balanced", "fact_greedy_exact", "fact_correct"):
            record.pop(key)
    test = [r["allocation"] for r in data.records[100:]]
    alone, joined = fit(subset).predict_many(test), fit(mixed).predict_many(test)
    for name in ("fact_retention_balanced", "fact_acc_balanced"):
        truth = [r[name] for r in data.records[100:]]
        assert spearmanr(joined[name], truth).statistic > max(0.8, spearmanr(alone[name], truth).statistic - 0.03)
    truth = [r["ppl"] for r in data.records[100:]]  # log ppl is fitted on all 200 records: better than on 60
    assert spearmanr(joined["ppl"], truth).statistic >= spearmanr(alone["ppl"], truth).statistic
    figures = cross_validated(mixed)
    assert figures["metrics"]["fact_acc_balanced"]["n"] == 60 and figures["metrics"]["log_ppl"]["n"] == 200


def _lender(data: Dataset, seed: int) -> Dataset:
    """The same allocations (same draws) evaluated on other facts, plus more draws: what the packaged data
    set is to a knowledge build."""
    lender = synthetic(n_records=240, seed=seed)
    lender.records[:len(data.records)] = [
        {**r, "ppl": r["ppl"] * 1.001, "fact_acc": 0.123} for r in synthetic(n_records=len(data.records)).records]
    lender.header["context"] = {**CONTEXT, "facts": {"source": "other", "n": 99, "offset": 0}}
    return lender


def test_merge_lends_perplexities_of_a_data_set_on_other_facts(tmp_path, capsys):
    knowledge = with_knowledge(synthetic(n_records=40))
    shard, lender = write(knowledge, tmp_path / "k.jsonl"), write(_lender(knowledge, seed=1), tmp_path / "ppl.jsonl")
    code, out, _ = _main(["merge", str(shard), "--perplexity-from", str(lender), "--out", str(tmp_path / "j.jsonl")],
                         capsys)
    assert code == 0 and "240 records merged" in out
    joined = read_dataset(tmp_path / "j.jsonl")
    assert joined.header["perplexity_from"] == [str(lender)] and joined.header["context"] == CONTEXT
    assert joined.records[:40] == knowledge.records  # a draw in both is the knowledge build's own record
    lent = joined.records[40:]
    assert all(r["perplexity_only"] and "fact_acc" not in r and "quality" not in r for r in lent)
    assert [r["ppl"] for r in lent] == [r["ppl"] for r in read_dataset(lender).records[40:]]  # same dense ppl
    model = fit(joined)
    assert model.knows and model.predict(lent[0]["allocation"])["fact_acc_balanced"] >= 0.0


@pytest.mark.parametrize("change, message", [
    (lambda h: {**h, "context": {**h["context"], "text": {"source": "z"}}}, "different text"),
    (lambda h: {**h, "dense": {**h["dense"], "ppl": 30.0}}, "dense perplexity 30.000"),
])
def test_merge_refuses_perplexities_of_another_evaluation(tmp_path, capsys, change, message):
    knowledge = with_knowledge(synthetic(n_records=20))
    lender = _lender(knowledge, seed=1)
    lender.header = change(lender.header)
    paths = write(knowledge, tmp_path / "k.jsonl"), write(lender, tmp_path / "ppl.jsonl")
    code, _, err = _main(["merge", str(paths[0]), "--perplexity-from", str(paths[1]), "--out",
                          str(tmp_path / "j.jsonl")], capsys)
    assert code == 2 and message in err and not (tmp_path / "j.jsonl").exists()


@pytest.mark.parametrize("change, line, message", [
    (lambda r: {**r, "fact_correct": "zz"}, 2, "field 'fact_correct' is \"zz\", not a hex bitmask of 6 digits"),
    (lambda r: {**r, "fact_greedy_exact": "f" * 7}, 3, "not a hex bitmask of 6 digits"),
    (lambda r: {k: v for k, v in r.items() if k != "fact_correct"}, 4, "field 'fact_correct' is missing"),
    (lambda h: {k: v for k, v in h.items() if k != "fact_set"}, 1, "2: per-fact flags, but the header has no 'fact_set'"),
    (lambda h: {**h, "fact_set": {**h["fact_set"], "labels": [["r", 1]]}}, 1, "field 'fact_set.labels'"),
])
def test_bad_knowledge_fields_are_refused_naming_the_line(tmp_path, change, line, message):
    path = _edit(write(with_knowledge(synthetic(n_records=6)), tmp_path / "set.jsonl"), line, change)
    with pytest.raises(ValueError) as error:
        read_dataset(path)
    assert type(error.value).__name__ == "SurrogateDataError" and message in str(error.value)


def test_quality_of_is_the_env_s_reward_formula():
    from prune_env.envs.rewards import RewardConfig, quality
    from prune_env.surrogate import quality_of

    reward = {**REWARD, "fact_weight": 2.5}
    got = quality_of({"ppl": np.array([20.0, 31.0]), "fact_acc": np.array([0.8, 0.55])}, DENSE, reward)
    config = RewardConfig.from_dict(reward)
    assert got.tolist() == [quality(p, a, DENSE["ppl"], DENSE["fact_acc"], config) for p, a in ((20.0, 0.8), (31.0, 0.55))]


# --------------------------------------------------------------------------- the command line and the layering


def _main(argv: list[str], capsys) -> tuple[int, str, str]:
    from prune_env.surrogate.__main__ import main

    try:
        code = main(argv)
    except SystemExit as stop:  # --help and argparse's own errors
        code = stop.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_every_subcommand_has_help(capsys):
    for command in ("build", "merge", "fit", "check", "visited", "scores"):
        code, out, _ = _main([command, "--help"], capsys)
        assert code == 0 and out.startswith(f"usage: python -m prune_env.surrogate {command}")


def test_a_tiny_build_of_two_draws_then_check_and_fit(tmp_path, tiny_data, capsys):
    path = tmp_path / "tiny.jsonl"
    data = {**tiny_data, "n_facts": 0}
    code, out, err = _main(["build", "--model", "tiny-llama", "--out", str(path), "--rounds", "0", "--shard", "0/2",
                            "--data", json.dumps(data), "--no-fit"], capsys)
    assert code == 0, err
    built = read_dataset(path)
    assert [r["draw"] for r in built.records] == [0, 2]
    assert len(built.header["fact_set"]["labels"]) == built.header["context"]["facts"]["n"] > 0
    from prune_env.surrogate import knowledge_of

    for record in built.records:
        assert knowledge_of(built.header, record) == {k: record[k] for k in ("fact_retention_balanced",
                                                                              "fact_acc_balanced")}
    code, out, err = _main(["check", str(path)], capsys)
    assert code == 0 and "2 records" in out and "2 with per-fact flags, 0 whose flags disagree" in out
    code, _, err = _main(["build", "--model", "tiny-llama", "--out", str(path), "--shard", "2/2"], capsys)
    assert code == 2 and err.startswith("error: --shard '2/2' must be I/N") and err.count("\n") == 1
    figures = tmp_path / "figures.json"
    code, out, err = _main(["fit", str(write(with_knowledge(synthetic(n_records=40)), tmp_path / "s.jsonl")),
                            "--json", str(figures)], capsys)
    assert code == 0 and "5-fold (by draw) fact_retention_balanced on " in out
    assert "fact_retention_balanced" in json.loads(figures.read_text())["metrics"]
    code, out, _ = _main(["fit", str(path)], capsys)  # 2 records: counted, too few for k-fold figures
    assert code == 0 and "2 records" in out and "fold" not in out


def test_only_the_command_modules_import_agents():
    """prune_env's library modules never import agents; the surrogate's commands (which draw with agents'
    rules and load trained policies) are the one exception, and importing the package loads none of them."""
    import ast
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1] / "prune_env"
    allowed = {root / "surrogate" / "__main__.py", *(root / "surrogate" / "commands").glob("*.py")}
    offenders = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            if any(n == "agents" or n.startswith("agents.") for n in names) and path not in allowed:
                offenders.append(str(path.relative_to(root.parent)))
    assert not offenders, f"library modules importing agents: {offenders}"
    loaded = subprocess.run([sys.executable, "-c", "import sys, prune_env, prune_env.surrogate, prune_env.envs.fidelities; "
                             "print(sorted(m for m in sys.modules if m.split('.')[0] == 'agents'))"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"


def test_a_build_resumes_on_the_same_facts_and_refuses_others(tmp_path):
    """The dense flags are rescored at each start (a near tie may flip with the thread count): only the
    facts themselves must agree for a resumed build."""
    facts = {"labels": [["r", "a"], ["r", "b"]], "fact_greedy_exact": "1", "fact_correct": "3"}
    header = {"context": CONTEXT, "plan": {"seed": 0}, "fact_set": facts}
    path = tmp_path / "set.jsonl"
    start_dataset(path, header)
    append_record(path, {"draw": 0, "fact_greedy_exact": "1", "fact_correct": "2"})
    resumed = start_dataset(path, {**header, "fact_set": {**facts, "fact_correct": "1"}})
    assert resumed.header["fact_set"] == facts and len(resumed.records) == 1
    with pytest.raises(ValueError, match="different fact_set"):
        start_dataset(path, {**header, "fact_set": {**facts, "labels": [["r", "a"], ["r", "c"]]}})


def test_build_names_a_damaged_output_or_bad_data_before_the_model_loads(tmp_path, capsys):
    damaged = tmp_path / "damaged.jsonl"
    damaged.write_text('{"format": "something-else"}\n')
    code, _, err = _main(["build", "--model", "no-such-model", "--out", str(damaged)], capsys)
    assert code == 2 and "is not a prune-gym-surrogate version 1 data set" in err and err.count("\n") == 1
    code, _, err = _main(["build", "--model", "no-such-model", "--out", str(tmp_path / "new.jsonl"),
                          "--data", '{"n_fact": 3}'], capsys)
    assert code == 2 and "n_fact" in err and err.count("\n") == 1
    assert not (tmp_path / "new.jsonl").exists()


def test_a_rank_correlation_that_is_undefined_is_none_not_nan():
    """At a high target a small model may retain no fact at all: a constant truth has no rank correlation."""
    data = synthetic()
    for record in data.records:
        if record["target"] == 0.6:
            record["fact_retention"] = 0.0
    per_target = cross_validated(data)["metrics"]["fact_retention"]["spearman_per_target"]
    assert per_target["0.6"] is None and all(isinstance(per_target[t], float) for t in ("0.3", "0.4", "0.5"))


def test_merge_keeps_visited_records_that_share_a_draw_number_and_refuses_two_plans(tmp_path):
    """Two re-anchoring files (or a shard and its lender) each number their visited records from
    VISITED_DRAWS: the same number is two allocations, and both are kept. A planned draw with two
    allocations means two plans, which no merge can reconcile."""
    from prune_env.surrogate.dataset import VISITED_DRAWS, merge

    base = synthetic(n_records=8)
    def visited(data: Dataset, shift: float) -> Dataset:
        extra = [{**r, "draw": VISITED_DRAWS + i, "kind": "visited", "allocation": [a + shift for a in r["allocation"]]}
                 for i, r in enumerate(data.records[:2])]
        return Dataset(data.header, [*data.records, *extra])
    first, second = write(visited(base, 0.01), tmp_path / "a.jsonl"), write(visited(base, 0.02), tmp_path / "b.jsonl")
    assert merge([first, second], tmp_path / "ab.jsonl") == 12
    merged = read_dataset(tmp_path / "ab.jsonl").records
    assert [r["draw"] for r in merged] == [*range(8), *range(VISITED_DRAWS, VISITED_DRAWS + 4)]
    shifted = [round(r["allocation"][0] - base.records[i % 2]["allocation"][0], 6) for i, r in enumerate(merged[8:])]
    assert shifted == [0.01, 0.01, 0.02, 0.02]  # the second file's visited records renumbered after the first's
    lender = _lender(base, seed=1)
    lender = visited(Dataset(lender.header, lender.records[:20]), 0.03)
    assert merge([first], tmp_path / "joined.jsonl", [write(lender, tmp_path / "lender.jsonl")]) == 24
    joined = read_dataset(tmp_path / "joined.jsonl").records
    assert sum(r.get("kind") == "visited" and r.get("perplexity_only", False) for r in joined) == 2
    other = synthetic(n_records=8, seed=5)  # another plan: draw 0 is another allocation
    with pytest.raises(ValueError, match="draw 0 with another allocation"):
        merge([first, write(other, tmp_path / "other.jsonl")], tmp_path / "bad.jsonl")
