"""scripts/learned_summary.py: the policy seeds' mean against every other agent, with paired intervals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from script_modules import load_script

ROOT = Path(__file__).resolve().parents[1]


def _module():
    return load_script("learned_summary")


def _record(agent: str, target: float, nll_per_token: np.ndarray, correct: np.ndarray) -> dict:
    tokens = np.full(nll_per_token.shape, 100)
    return {"agent": agent, "seed": 0, "target_sparsity": target, "status": "ok",
            "ppl": float(np.exp((nll_per_token * tokens).sum() / tokens.sum())),
            "fact_acc": float(correct.mean()), "fact_retention": float(correct[:10].mean()),
            "per_window": {"nll": (nll_per_token * tokens).tolist(), "tokens": tokens.tolist()},
            "per_fact": {"correct": correct.astype(bool).tolist(), "greedy_exact": correct.astype(bool).tolist()}}


def _results(target: float = 0.5, draw: int = 0, policy_shift: float = 0.0) -> dict:
    """One grid; `draw` moves every agent's nll alike (another calibration draw), `policy_shift` the policies'."""
    rng = np.random.default_rng(0)
    base = 3.0 + rng.normal(0, 0.2, 24) + 0.05 * draw  # per-window nll of the worst agent
    facts = rng.random(60) < 0.6
    records = [_record("uniform", target, base, facts),
               _record("rule", target, base - 0.10, facts)]  # clearly better than uniform on every window
    for seed, shift in enumerate((0.04, 0.05, 0.06)):        # policies: between the two on every window
        records.append(_record(f"ppo-s{seed}", target, base - shift + policy_shift, facts))
    return {"records": records, "dense_per_fact": {"greedy_exact": [True] * 10 + [False] * 50},
            "data": {"text": {"source": "t", "evaluation": {"region": [0, 2400]}, "calibration": {"starts": [draw]}},
                     "facts": {"n": 60}}}


def _rows(lines: list[str]) -> dict[str, str]:
    return {line.split("|")[1].strip(): line for line in lines if line.startswith("| ") and "against" not in line}


def test_policies_beat_the_worse_agent_and_lose_to_the_better_one():
    lines = _module().summary([_results()], ["ppo-s0", "ppo-s1", "ppo-s2"])
    text = "\n".join(lines)
    assert "mean of 3 policies:" in text
    rows = _rows(lines)
    assert set(rows) == {"uniform", "rule"}
    ratio_vs_uniform = rows["uniform"].split("|")[3]
    ratio_vs_rule = rows["rule"].split("|")[3]
    assert "**beats**" in ratio_vs_uniform and float(ratio_vs_uniform.split()[0]) < 1
    assert "worse" in ratio_vs_rule and float(ratio_vs_rule.split()[0]) > 1
    assert "tie" in rows["uniform"].split("|")[4]  # same facts answered: no accuracy difference


def test_a_missing_policy_seed_is_reported_not_averaged_away():
    results = _results(draw=1)
    results["records"] = [r for r in results["records"] if r["agent"] != "ppo-s2"]
    lines = _module().summary([_results(), results], ["ppo-s0", "ppo-s1", "ppo-s2"])
    assert lines[0].startswith("target 0.5: policies missing") and "ppo-s2" in lines[0]


def test_calibration_draws_pool_pairs_within_each_draw():
    """A policy that loses in one draw and wins by more in another: the pooled verdict is of the mean."""
    module = _module()
    policies = ["ppo-s0", "ppo-s1", "ppo-s2"]
    losing, winning = _results(draw=0, policy_shift=0.10), _results(draw=1, policy_shift=-0.05)
    ratio = {name: float(_rows(module.summary(draws, policies))["uniform"].split("|")[3].split()[0])
             for name, draws in (("losing", [losing]), ("winning", [winning]), ("pooled", [losing, winning]))}
    assert ratio["losing"] > 1 > ratio["winning"]
    assert ratio["winning"] < ratio["pooled"] < ratio["losing"]
    # paired within each draw: draw 1's higher nll for every agent does not leak into the ratio
    assert abs(np.log(ratio["pooled"]) - np.mean(np.log([ratio["losing"], ratio["winning"]]))) < 1e-3
    assert "x 2 calibration draws" in "\n".join(module.summary([losing, winning], policies))
    other_target = _results(target=0.4, draw=2)  # a draw that ran another target counts only for that one
    text = "\n".join(module.summary([losing, winning, other_target], policies))
    assert "target 0.4: mean of 3 policies x 1 calibration draw:" in text
    assert "target 0.5: mean of 3 policies x 2 calibration draws" in text


def test_results_of_different_held_out_data_are_not_pooled():
    module = _module()
    other = _results(draw=1)
    other["data"]["text"]["evaluation"] = {"region": [2400, 4800]}  # other windows: nothing to pair
    with pytest.raises(ValueError, match="only calibration draws"):
        module.summary([_results(), other], ["ppo-s0"])
    with pytest.raises(ValueError, match="same calibration windows"):  # one draw twice would count double
        module.summary([_results(draw=1), _results(draw=1)], ["ppo-s0"])


def test_cli_writes_the_table_and_refuses_a_file_that_is_not_results(tmp_path: Path, capsys):
    module = _module()
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"nonsense": True}))
    assert module.main([str(path), "--policy", "ppo-s0"]) == 2
    assert "not a readable results.json" in capsys.readouterr().err


def test_committed_summaries_are_what_the_script_makes_of_the_committed_results(tmp_path: Path):
    """The study READMEs' verdict tables quote summary.md: it must be regenerated whenever results.json changes."""
    module = _module()
    for grid in ("learned-smollm2", "learned-smollm2-unseen"):
        folder = ROOT / "docs" / "results" / grid
        out = tmp_path / f"{grid}.md"
        assert module.main([str(folder / "results.json"), "--policy", "ppo-s0", "ppo-s1", "ppo-s2",
                            "--out", str(out)]) == 0
        assert out.read_text() == (folder / "summary.md").read_text(), f"{grid}/summary.md is stale"
    draws = ROOT / "docs" / "results" / "calibration-draws"
    for text, grid in (("handbook", "learned-smollm2"), ("unseen", "learned-smollm2-unseen")):
        paths = [ROOT / "docs" / "results" / grid / "results.json"]
        paths += [draws / f"{text}-c{c}" / "results.json" for c in (1, 2, 3)]
        out = tmp_path / f"draws-{text}.md"
        assert module.main([*map(str, paths), "--policy", "ppo-s0", "ppo-s1", "ppo-s2", "--out", str(out)]) == 0
        assert out.read_text() == (draws / f"summary-{text}.md").read_text(), f"summary-{text}.md is stale"
