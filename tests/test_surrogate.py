"""The surrogate reward: its data-set builder (writes, resumes, survives a kill) and its fit (ranks
held-out allocations of a known additive structure, refuses another model's env, is deterministic)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from prune_env.surrogate import (Dataset, SurrogateMismatchError, append_record, fit, heldout, load_surrogate,
                                 read_dataset, start_dataset)
from script_modules import load_script

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


def test_fit_ranks_heldout_allocations_of_a_known_additive_structure():
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
    figures = heldout(data, folds=5)
    assert figures["spearman"] > 0.95 and abs(figures["bias"]) < 0.05
    assert len(figures["predicted"]) == len(data.records)
    assert min(figures["retention_spearman_per_target"].values()) > 0.8  # retention falls with weighted sparsity
    assert figures["retention_mae"] < 0.05


def test_fit_does_not_rank_noise():
    """The held-out figure is a real test: on rewards unrelated to the allocation it is near zero."""
    data = synthetic()
    rng = np.random.default_rng(1)
    for record in data.records:
        record["ppl"] = DENSE["ppl"] * float(np.exp(rng.normal(0.0, 0.3)))
        record["quality"] = -float(np.log(record["ppl"] / DENSE["ppl"])) - (DENSE["fact_acc"] - record["fact_acc"])
        record["fact_retention"] = float(rng.uniform(0.0, 1.0))
    figures = heldout(data, folds=5)
    assert np.mean([abs(v) for v in figures["spearman_per_target"].values()]) < 0.5
    assert np.mean([abs(v) for v in figures["retention_spearman_per_target"].values()]) < 0.5


def test_load_refuses_another_model_and_predicts_deterministically(tmp_path):
    path = write(synthetic(), tmp_path / "set.jsonl")
    surrogate = load_surrogate(path, CONTEXT)
    allocation = synthetic().records[0]["allocation"]
    first = surrogate.predict(allocation, 0.3)
    assert first == surrogate.predict(allocation, 0.3)
    assert first == load_surrogate(path, dict(CONTEXT)).predict(allocation, 0.3)
    assert set(first) == {"ppl", "fact_acc", "fact_nll", "fact_retention"}
    with pytest.raises(SurrogateMismatchError, match=r"model=\"synthetic\".*model=\"tiny-llama\".*build_surrogate"):
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
    builder = load_script("build_surrogate")
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

    builder = load_script("build_surrogate")
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
    """scripts/visited_fidelity.py --calibration: each re-anchoring round is predicted by the fit on the
    rest; a round whose exact rewards fall below the structure the fit learned shows up as positive z."""
    data = synthetic(n_records=200)
    for record in data.records[-24:]:  # two rounds of 12 policy-visited records
        honest = record["draw"] % 2 == 0
        record.update(kind="visited", params={"policy": "honest" if honest else "optimistic-about"})
        if not honest:  # the exact model lost 20 % more perplexity than the structure says
            record["ppl"] *= 1.2
            record["quality"] -= float(np.log(1.2))
    calibration = load_script("visited_fidelity").spread_calibration(write(data, tmp_path / "d.jsonl"))
    rounds = calibration["rounds"]
    assert set(rounds) == {"honest", "optimistic-about"} and calibration["records"] == 24
    assert rounds["optimistic-about"]["bias"] > 0.1 > abs(rounds["honest"]["bias"])
    assert rounds["optimistic-about"]["mean_z"] > rounds["honest"]["mean_z"]
    covered = [calibration["covered"][k] for k in ("1.0", "2.0", "3.0")]
    assert covered == sorted(covered) and covered[0] < 1.0  # more pessimism covers more, one spread not all


def test_spread_calibration_needs_a_reanchoring_round(tmp_path):
    with pytest.raises(ValueError, match="no re-anchoring round"):
        load_script("visited_fidelity").spread_calibration(write(synthetic(), tmp_path / "d.jsonl"))


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
