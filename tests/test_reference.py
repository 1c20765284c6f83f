"""Reference scores (prune_env/envs/reference.py, scripts/reference_scores.py) and the one version number."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from prune_env.envs import reference
from tests.script_modules import load_script

ROOT = Path(__file__).resolve().parents[1]
TASK = "m/wanda/block/exact"


@pytest.fixture
def table(tmp_path) -> str:
    """A two-target table: uniform -1 / -2, best known -0.5 / -1 at 0.4 / 0.6."""
    rows = {f"{t:.1f}": {"uniform": u, "best_rule": {"name": "owl", "return": u + 0.1},
                         "best_known": {"name": "ppo", "return": b}, "returns": {}}
            for t, u, b in ((0.4, -1.0, -0.5), (0.6, -2.0, -1.0))}
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"tasks": {TASK: rows}}))
    return str(path)


def test_normalised_score_interpolates_between_targets(table):
    assert reference.normalised_score(TASK, 0.4, -1.0, table) == 0.0
    assert reference.normalised_score(TASK, 0.4, -0.5, table) == 1.0
    assert reference.normalised_score(TASK, 0.6, -1.5, table) == pytest.approx(0.5)
    # halfway: uniform -1.5, best -0.75
    assert reference.anchors(TASK, 0.5, table) == pytest.approx((-1.5, -0.75))
    assert reference.normalised_score(TASK, 0.5, -0.75, table) == pytest.approx(1.0)
    for task, target, value in ((TASK, 0.3, -1.0), (TASK, 0.61, -1.0), ("other/wanda/block/exact", 0.5, -1.0),
                                (TASK, 0.5, math.nan), (TASK, math.nan, -1.0)):
        assert reference.normalised_score(task, target, value, table) is None


def test_missing_or_malformed_table_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="scripts/reference_scores.py"):
        reference.load_table(str(tmp_path / "none.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a reference table.*reference_scores.py"):
        reference.load_table(str(bad))


def test_build_table_takes_the_mean_ppo_and_the_best_agent():
    script = load_script("reference_scores")
    returns = {"uniform": -1.0, "owl": -1.2, "alphapruning": -0.9, "zscore-greedy": -1.1, "ramp": -1.3,
               "protect-first": -0.95, **{p: r for p, r in zip(script.POLICIES, (-0.8, -0.9, -0.7))}}
    records = [{"task": TASK, "target": 0.5, "agent": a, "return": r} for a, r in returns.items()]
    records.append({"task": TASK, "target": 0.6, "agent": "uniform", "return": -2.0})  # unfinished: left out
    row = script.build_table(records)["tasks"][TASK]
    assert list(row) == ["0.5"]
    assert row["0.5"]["uniform"] == -1.0 and row["0.5"]["best_rule"] == {"name": "alphapruning", "return": -0.9}
    assert row["0.5"]["best_known"] == {"name": "ppo", "return": pytest.approx(-0.8)}


def test_committed_table_covers_smollm2_exact_and_surrogate():
    for fidelity in ("exact", "surrogate"):
        task = reference.task_key("smollm2-135m", "wanda", "block", fidelity)
        assert sorted(reference.load_table()["tasks"][task]) == ["0.3", "0.4", "0.5", "0.6"]
        for target in (0.3, 0.45, 0.6):
            uniform, best = reference.anchors(task, target)
            assert reference.normalised_score(task, target, uniform) == pytest.approx(0.0, abs=1e-12)
            assert best > uniform
    assert "| smollm2-135m/wanda/block/exact | 0.5 |" in reference.markdown()


def test_reward_threshold_is_the_tables_exact_uniform_return_at_half():
    import gymnasium as gym

    import prune_env

    row = reference.load_table()["tasks"]["smollm2-135m/wanda/block/exact"]["0.5"]
    assert prune_env.UNIFORM_WANDA_RETURN == pytest.approx(row["uniform"], abs=5e-4)
    assert gym.spec("prune_env/LayerPrune-v1").reward_threshold == prune_env.UNIFORM_WANDA_RETURN


def test_one_version_number_and_the_table_is_package_data():
    from setuptools.config.pyprojecttoml import read_configuration

    import prune_env

    config = read_configuration(ROOT / "pyproject.toml", expand=True)
    assert config["project"]["version"] == prune_env.__version__
    table = reference.TABLE.relative_to(Path(prune_env.__file__).parent).as_posix()  # the file the package reads
    assert table in config["tool"]["setuptools"]["package-data"]["prune_env"]


def test_task_for_needs_the_default_reward_and_data(tiny_data):
    from prune_env.context import PruningContext
    from prune_env.envs.rewards import RewardConfig

    ctx = PruningContext("tiny-llama", data=tiny_data)
    assert reference.task_for(ctx, "exact", RewardConfig()) is None  # the tiny data are not the defaults
    ctx.data = type(ctx.data)()  # only the description is read: the defaults' key
    assert reference.task_for(ctx, "proxy", RewardConfig()) == "tiny-llama/wanda/block/proxy"
    assert reference.task_for(ctx, "exact", RewardConfig(fact_weight=2.0)) is None
