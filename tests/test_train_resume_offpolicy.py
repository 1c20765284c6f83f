"""SAC checkpoints (replay buffer in safetensors) resume bit for bit, and VecNormalize statistics
(vecnormalize.json) travel with checkpoints and the final policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import train
from agents.rl import load_policy, read_run_config
from prune_env.envs.factory import make_env
from test_train import SMOKE, Interrupt


def sac_overrides(tiny_data: dict, run_dir: Path, *extra: str) -> list[str]:
    return ["--config", SMOKE, f"env.data.text={tiny_data['text']}", f"env.data.facts={tiny_data['facts']}",
            f"run_dir={run_dir}", "algo.name=sac", "algo.total_timesteps=24", "checkpoint.every_steps=12",
            "algo.hyperparams={learning_starts: 6, buffer_size: 64, batch_size: 8, gamma: 1.0}",
            "eval.every_steps=0", "eval.final=false", "logging.wandb=disabled", "logging.tensorboard=false",
            "logging.progress_bar=false", *extra]


def test_sac_resume_is_bit_identical(tiny_data: dict, tmp_path: Path):
    assert train.main(sac_overrides(tiny_data, tmp_path / "whole")) == 0
    args = sac_overrides(tiny_data, tmp_path / "cut")
    with pytest.raises(train.SimulatedFailure):
        train.train(train.resolve_config(SMOKE, args[2:]), extra_callbacks=(Interrupt(15),))
    (checkpoint,) = [path for _, path in train.list_checkpoints(tmp_path / "cut" / "checkpoints")]
    assert {p.name for p in checkpoint.iterdir()} == {"model.zip", "replay_buffer.safetensors", "rng.safetensors",
                                                      "state.json"}
    assert train.main([*args, "--resume"]) == 0
    env = make_env(**read_run_config(tmp_path / "whole").env_kwargs())
    whole, resumed = load_policy(tmp_path / "whole", env).model, load_policy(tmp_path / "cut", env).model
    env.close()
    assert whole.num_timesteps == resumed.num_timesteps == 24
    for name, tensor in whole.policy.state_dict().items():
        assert tensor.equal(resumed.policy.state_dict()[name]), name
    assert whole.log_ent_coef.equal(resumed.log_ent_coef)


def test_observation_statistics_are_saved_as_json_and_used_by_the_policy(tiny_data: dict, tmp_path: Path):
    run = tmp_path / "norm"
    assert train.main([*sac_overrides(tiny_data, run, "algo.normalize_obs=true"), "eval.final=true"]) == 0
    stats = json.loads((run / "vecnormalize.json").read_text())
    assert stats["norm_obs"] and stats["obs_count"] > 24 and len(stats["obs_mean"]) == 9
    (last,) = [path for step, path in train.list_checkpoints(run / "checkpoints") if step == 24]
    assert json.loads((last / "vecnormalize.json").read_text()) == stats
    env = make_env(**read_run_config(run).env_kwargs(evaluation=True))
    policy = load_policy(run, env)
    assert policy.normalizer is not None
    final_eval = json.loads((run / "eval.jsonl").read_text().splitlines()[-1])
    assert policy.rollout(env, seed=0)["allocation"] == final_eval["allocation"]  # as evaluated in training
    env.close()


@pytest.mark.parametrize("algo", ["ppo", "sac"])
def test_a_resumed_run_with_normalize_obs_equals_an_uninterrupted_one(algo: str, tiny_data: dict, tmp_path: Path):
    """The first reset of a resumed run was counted again in VecNormalize's statistics (obs_count 26 vs 25 after
    24 steps): the statistics, and so the policy, drifted from the uninterrupted run's."""
    extra = ("algo.normalize_obs=true",) + (("algo.name=ppo", "algo.hyperparams={n_steps: 12, batch_size: 6}")
                                             if algo == "ppo" else ())
    assert train.main(sac_overrides(tiny_data, tmp_path / "whole", *extra)) == 0
    args = sac_overrides(tiny_data, tmp_path / "cut", *extra)
    with pytest.raises(train.SimulatedFailure):
        train.train(train.resolve_config(SMOKE, args[2:]), extra_callbacks=(Interrupt(15),))
    assert [step for step, _ in train.list_checkpoints(tmp_path / "cut" / "checkpoints")] == [12]
    assert train.main([*args, "--resume"]) == 0
    whole, cut = (json.loads((tmp_path / run / "vecnormalize.json").read_text()) for run in ("whole", "cut"))
    assert whole["obs_count"] == cut["obs_count"] and whole == cut
    env = make_env(**read_run_config(tmp_path / "whole").env_kwargs())
    first, second = load_policy(tmp_path / "whole", env).model, load_policy(tmp_path / "cut", env).model
    env.close()
    for name, tensor in first.policy.state_dict().items():
        assert tensor.equal(second.policy.state_dict()[name]), name


def test_a_resumed_run_draws_the_targets_an_uninterrupted_one_draws(tiny_data: dict, tmp_path: Path):
    """env.target_sparsity_range: the resumed envs were re-seeded, so their episode targets (and the policy)
    differed from the uninterrupted run's; each env's target and generator state now travel in state.json."""
    extra = ("algo.name=ppo", "algo.hyperparams={n_steps: 12, batch_size: 6}", "env.env_id=prune_env/LayerPrune-v1",
             "env.target_sparsity_range=[0.3, 0.6]")
    assert train.main(sac_overrides(tiny_data, tmp_path / "whole", *extra)) == 0
    for name, keep_envs in (("cut", True), ("older", False)):
        args = sac_overrides(tiny_data, tmp_path / name, *extra)
        with pytest.raises(train.SimulatedFailure):
            train.train(train.resolve_config(SMOKE, args[2:]), extra_callbacks=(Interrupt(15),))
        (checkpoint,) = [path for _, path in train.list_checkpoints(tmp_path / name / "checkpoints")]
        state = json.loads((checkpoint / "state.json").read_text())
        assert len(state["envs"]) == 1 and 0.3 <= state["envs"][0]["target"] <= 0.6
        if not keep_envs:  # a checkpoint of an older train.py: resumes, re-seeded as before
            del state["envs"]
            (checkpoint / "state.json").write_text(json.dumps(state))
        assert train.main([*args, "--resume"]) == 0
    env = make_env(**read_run_config(tmp_path / "whole").env_kwargs())
    whole, cut, older = (load_policy(tmp_path / name, env).model for name in ("whole", "cut", "older"))
    env.close()
    assert all(tensor.equal(cut.policy.state_dict()[name]) for name, tensor in whole.policy.state_dict().items())
    assert not all(tensor.equal(older.policy.state_dict()[name]) for name, tensor in whole.policy.state_dict().items())
