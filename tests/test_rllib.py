"""RLlib PPO (scripts/rllib_ppo.py) trains on LayerPrune-v1's surrogate fidelity of the tiny model: one
env runner process, two iterations (the `rllib` extra; CI installs it)."""

from __future__ import annotations

import math

import pytest

from tests.script_modules import load_script
from tests.tiny_surrogate import write_tiny_dataset

pytest.importorskip("ray.rllib", reason='RLlib needs the rllib extra: pip install -e ".[rllib]"')


@pytest.fixture(scope="module")
def tiny_surrogate(tiny_data, tmp_path_factory):
    """A surrogate data set of six exact tiny-model episodes (tests/tiny_surrogate.py)."""
    path = tmp_path_factory.mktemp("rllib") / "tiny.jsonl"
    write_tiny_dataset(path, tiny_data)
    return str(path)


@pytest.mark.rllib
def test_rllib_ppo_trains_on_the_surrogate_env(tiny_data, tiny_surrogate):
    rllib_ppo = load_script("rllib_ppo")
    env_config = {**rllib_ppo.DEFAULT_ENV, "model": "tiny-llama", "data": tiny_data, "surrogate": tiny_surrogate}
    records = rllib_ppo.run(env_config, runners=1, iterations=2, batch=60)
    assert [r["iteration"] for r in records] == [1, 2]
    for record in records:
        assert record["env_steps"] >= 60  # the runner sampled at least one train batch of env steps
        assert math.isfinite(record["policy_loss"]) and math.isfinite(record["vf_loss"])
        assert math.isfinite(record["episode_return_mean"])  # 3-step episodes: many finished per iteration


def test_rllib_cli_refuses_bad_arguments(capsys):
    rllib_ppo = load_script("rllib_ppo")
    with pytest.raises(SystemExit) as exit_info:
        rllib_ppo.main(["--iterations", "1"])
    assert exit_info.value.code == 2 and "--iterations >= 2" in capsys.readouterr().err
