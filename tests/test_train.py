"""train.py end to end on the tiny model: logging outputs, checkpoints, resume, --eval, config errors.

Everything runs in-process through train.main / train.train (one model load for the whole file) on
configs/smoke.yaml with generated text and facts: 60 PPO steps = 20 three-step episodes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from stable_baselines3.common.callbacks import BaseCallback

import train
from agents.rl import RLAgent, load_policy, read_run_config
from prune_env.pruning.allocation_files import parse_allocation
from prune_env.config_files import ConfigError
from prune_env.envs.factory import make_env

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")


def smoke_overrides(tiny_data: dict, run_dir: Path) -> list[str]:
    return [f"env.data.text={tiny_data['text']}", f"env.data.facts={tiny_data['facts']}", f"run_dir={run_dir}"]


@pytest.fixture(scope="module")
def smoke_run(tiny_data: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted smoke run, shared by the tests that only read its outputs."""
    run_dir = tmp_path_factory.mktemp("train") / "smoke"
    assert train.main(["--config", SMOKE, *smoke_overrides(tiny_data, run_dir)]) == 0
    return run_dir


def _steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_smoke_run_writes_logs_checkpoints_and_policy(smoke_run: Path):
    from stable_baselines3 import PPO
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert (smoke_run / "config.yaml").is_file()
    assert PPO.load(smoke_run / "final_model.zip", device="cpu").num_timesteps == 60

    records = [json.loads(line) for line in (smoke_run / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [30, 60]
    for record in records:
        for key in ("reward", "ppl", "fact_acc", "fact_retention", "achieved_sparsity", "allocation"):
            assert key in record
        assert record["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
        assert len(record["allocation"]) == 3

    (events_dir,) = (smoke_run / "tensorboard").iterdir()
    events = EventAccumulator(str(events_dir))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/ppl")] == [30, 60]
    assert "rollout/ep_rew_mean" in events.Tags()["scalars"]

    (wandb_run,) = (smoke_run / "wandb").glob("offline-run-*")
    (log,) = wandb_run.glob("run-*.wandb")
    assert b"eval/fact_acc" in log.read_bytes()  # `wandb sync` can upload it later

    steps = [step for step, _ in train.list_checkpoints(smoke_run / "checkpoints")]
    assert steps == [24, 48, 60]  # first rollout boundary (12-step rollouts) after every 20 steps, then the end
    last = smoke_run / "checkpoints" / "step_0000000060"
    assert {p.name for p in last.iterdir()} == {"model.zip", "rng.safetensors", "state.json"}
    state = json.loads((last / "state.json").read_text())
    assert state["num_timesteps"] == 60 and [r["step"] for r in state["eval_history"]] == [30, 60]
    assert not list((smoke_run / "checkpoints").glob(".*"))  # no staging folder left


class Interrupt(BaseCallback):
    """Simulates a crash (kill) once training reaches `at` steps."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def _on_step(self) -> bool:
        if self.num_timesteps >= self.at:
            raise train.SimulatedFailure(f"killed at {self.num_timesteps}")
        return True


def test_resume_continues_from_the_last_checkpoint(tiny_data: dict, tmp_path: Path, smoke_run: Path, capsys):
    from stable_baselines3 import PPO

    run_dir = tmp_path / "run"
    args = ["--config", SMOKE, *smoke_overrides(tiny_data, run_dir)]
    config = train.resolve_config(SMOKE, args[2:])
    with pytest.raises(train.SimulatedFailure):
        train.train(config, extra_callbacks=(Interrupt(31),))
    ckpts = run_dir / "checkpoints"
    assert [step for step, _ in train.list_checkpoints(ckpts)] == [24]
    assert not (run_dir / "final_model.zip").exists()
    assert _steps(run_dir / "eval.jsonl") == [30]  # evaluated after the checkpoint, before the crash
    # a checkpoint being written when the process died: must be ignored and cleaned up
    partial = ckpts / ".tmp-step_0000000036-99999"
    partial.mkdir()
    (partial / "model.zip").write_bytes(b"truncated")
    staging = ckpts / ".step_0000000036.x1y2z3"  # staged_directory's folder
    staging.mkdir()
    half_written = run_dir / "final_model.zip.a1b2c3.tmp"  # atomic_path's temp file
    half_written.write_bytes(b"truncated")

    assert train.main(args) == 2  # the run exists: continuing it needs --resume
    capsys.readouterr()
    assert train.main([*args, "--resume"]) == 0
    assert "at num_timesteps=24" in capsys.readouterr().out
    assert not partial.exists() and not staging.exists() and not half_written.exists()
    final = PPO.load(run_dir / "final_model.zip", device="cpu")
    assert final.num_timesteps == 60
    assert [step for step, _ in train.list_checkpoints(ckpts)] == [24, 48, 60]
    assert _steps(run_dir / "eval.jsonl") == [30, 60]
    # RNG states and counters restored: the resumed run ends with the uninterrupted run's policy
    reference = PPO.load(smoke_run / "final_model.zip", device="cpu")
    for name, tensor in reference.policy.state_dict().items():
        assert tensor.equal(final.policy.state_dict()[name]), name
    assert train.main([*args, "--resume"]) == 0  # finished: nothing left to train
    assert "nothing to train" in capsys.readouterr().out


def test_saved_policy_gives_a_stable_allocation_and_eval_writes_it(smoke_run: Path, tmp_path: Path):
    env = make_env(**read_run_config(smoke_run).env_kwargs(evaluation=True))
    policy = load_policy(smoke_run, env)
    first, second = policy.rollout(env, seed=0)["allocation"], policy.rollout(env, seed=0)["allocation"]
    assert first == second and len(first) == 3
    context = env.unwrapped.context
    assert context.weighted_sparsity(first) == pytest.approx(0.5, abs=1e-3)

    out = tmp_path / "alloc.json"
    assert train.main(["--eval", str(smoke_run / "final_model.zip"), "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["allocation"] == first
    assert record["granularity"] == "block" and record["model"] == "tiny-llama"
    last_eval = json.loads((smoke_run / "eval.jsonl").read_text().splitlines()[-1])
    assert record["ppl"] == pytest.approx(last_eval["ppl"])
    ratios = parse_allocation(record, context.refs)  # what python -m prune_env.cli --allocation reads
    assert len(ratios) == len(context.refs)

    # the registry's RL agent plays the same episode on a lent context and gives the model back dense
    context.restore()
    dense = {name: tensor.clone() for name, tensor in context.model.state_dict().items()}
    agent = RLAgent(str(smoke_run), env={"fidelity": "exact"})
    assert agent.allocate(context, 0.5, seed=0) == first
    assert all(tensor.equal(dense[name]) for name, tensor in context.model.state_dict().items())
    assert agent.last_info["rl"]["algo"] == "ppo" and agent.deterministic
    env.close()


@pytest.mark.parametrize("override, message", [
    ("algo.total_timestep=100", "unknown config key 'algo.total_timestep'"),
    ("algo.total_timesteps=0", "algo: total_timesteps=0 is outside the allowed range [1, inf)"),
    ("algo.name=a2c", "algo: name='a2c' is not one of ['ppo', 'sac', 'dqn']"),
    ("env.target_sparsity=1.5", "env: target_sparsity=1.5 is outside the allowed range (0, 1)"),
    ("env.data.text=/no/such/corpus.txt", "does not exist"),
    ("algo.name=dqn algo.hyperparams={}", "needs env.action_type=discrete"),
    ("algo.hyperparams.n_step=8", "unknown config key 'hyperparams.n_step' for PPO"),
    ("env.pattern=2:4", "in quotes"),
    ("logging.wandb=cloud", "logging: wandb='cloud' is not one of"),
])
def test_bad_config_exits_2_with_a_clear_message(override: str, message: str, tmp_path: Path, capsys):
    assert train.main(["--config", SMOKE, *override.split(), f"run_dir={tmp_path / 'x'}"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("train.py: error:")
    assert not (tmp_path / "x").exists()


def test_cli_exit_status_for_a_bad_config_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("env:\n  modle: tiny-llama\n")
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(bad)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown config key env.'modle'" in proc.stderr


@pytest.mark.parametrize("name, algo", [(None, "ppo"), ("ppo", "ppo"), ("sac", "sac"), ("smoke", "ppo")])
def test_shipped_configs_resolve(name: str | None, algo: str):
    path = train.DEFAULT_CONFIG if name is None else ROOT / "configs" / f"{name}.yaml"
    config = train.resolve_config(path)
    assert config.algo.name == algo
    assert config.run_dir == f"runs/{name or 'ppo'}-0"
    assert config.env.fidelity == "proxy" and config.eval.fidelity == "exact"
    if name != "smoke":
        assert config.env.model == "smollm2-135m" and config.env.target_sparsity == 0.5
        if algo == "ppo":  # whole 30-step episodes per rollout, whole rollouts up to total_timesteps
            assert config.algo.hyperparams["n_steps"] % 30 == 0
            assert config.algo.total_timesteps % config.algo.hyperparams["n_steps"] == 0


def test_one_policy_for_every_target_draws_training_targets(tiny_data, tmp_path):
    """env.target_sparsity_range: training episodes draw their target; the evaluation episode keeps env.target."""
    from training.train_config import resolve_config
    from prune_env.envs.factory import make_env

    config = resolve_config(SMOKE, [*smoke_overrides(tiny_data, tmp_path / "run"), "env.target_sparsity_range=[0.3, 0.6]",
                                    "env.env_id=prune_env/LayerPrune-v1"])
    env = make_env(**config.env_kwargs())
    targets = set()
    for seed in range(6):
        _, info = env.reset(seed=seed)
        targets.add(round(float(env.unwrapped.target_sparsity), 6))
    assert len(targets) > 1 and all(0.3 <= t <= 0.6 for t in targets)
    assert config.env_kwargs(evaluation=True)["target_sparsity_range"] is None
    with pytest.raises(ConfigError, match="target_sparsity_range"):
        resolve_config(SMOKE, ["env.target_sparsity_range=[0.3, 0.95]"])
    with pytest.raises(ConfigError, match="env_id"):
        resolve_config(SMOKE, ["env.env_id=prune_env/IterativePrune-v0"])


def test_env_config_offers_every_env_keyword():
    """EnvConfig's fields come from LayerPruneEnv's signature: a new env keyword is a config key (typed and
    defaulted as in the env) at once, and one the config cannot offer fails loudly at import."""
    import dataclasses
    import inspect

    from training.train_config import ENV_KEYWORDS_NOT_IN_CONFIG, EnvConfig, env_keyword_fields
    from prune_env.config_files import dataclass_from_dict
    from prune_env.envs.layer import LayerPruneEnv

    keywords = set(inspect.signature(LayerPruneEnv.__init__).parameters) - {"self", "kwargs"}
    fields = {f.name for f in dataclasses.fields(EnvConfig)}
    assert fields == (keywords - set(ENV_KEYWORDS_NOT_IN_CONFIG)) | {"env_id"}

    def init(self, model: str = "m", new_knob: float = 1.5, tags: list = [], context=None, **kwargs):  # noqa: B006
        """A stand-in env's signature with two keywords LayerPruneEnv does not have."""

    def config_class(env_init, skip=None, **declared):
        env = type("StandIn", (), {"__init__": env_init})
        cls = type("Config", (), {"__annotations__": {"env_id": "str", **{k: "str" for k in declared}},
                                  "env_id": "x", **declared})
        return dataclasses.dataclass(env_keyword_fields(env, {"context": "live"} if skip is None else skip)(cls))

    widened = config_class(init)
    assert [f.name for f in dataclasses.fields(widened)] == ["env_id", "model", "new_knob", "tags"]
    first, second = widened(), widened()
    assert first.new_knob == 1.5 and first.tags == [] and first.tags is not second.tags
    assert dataclass_from_dict(widened, {"new_knob": 0.25}, "env").new_knob == 0.25
    with pytest.raises(ConfigError, match="env.new_knob"):
        dataclass_from_dict(widened, {"new_knob": "high"}, "env")  # typed by the env's annotation
    assert config_class(init, model="declared")().model == "declared"  # a declared field overrides the env's

    def no_default(self, model: str = "m", *, required_knob: float, context=None):
        """A stand-in env's signature with a keyword the caller must give."""

    with pytest.raises(TypeError, match="'required_knob' has no default"):
        config_class(no_default)
    with pytest.raises(TypeError, match=r"\['modle'\] are not keywords"):
        config_class(init, modle="typo")
    with pytest.raises(TypeError, match=r"\['gone'\] are not keywords"):
        config_class(init, skip={"context": "live", "gone": "removed from the env"})


def test_overrides_may_stand_on_both_sides_of_a_flag(capsys):
    """`key=value --resume key=value` once failed with 'unrecognized arguments' (argparse's plain parse)."""
    assert train.main(["--config", SMOKE, "algo.seed=3", "--resume", "algo.n_envs=1",
                       "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "seed: 3" in printed and "n_envs: 1" in printed
