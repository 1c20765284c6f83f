"""Reliability of train.py's run folders: no code runs from a policy or checkpoint, one writer per run
folder, and every bad value refused before anything is created.

The planted payload is a pickle whose `__reduce__` writes a marker file; a test first shows that it does
fire when unpickled (and through SB3's own `PPO.load`), so "marker absent" means our loaders never
unpickled it.
"""

from __future__ import annotations

import base64
import json
import pickle
import shutil
import zipfile
from pathlib import Path
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest

import train
from agents.rl import load_policy, read_run_config
from training.safe_load import (NormalizerStats, UnsafeFileError, load_replay_buffer, restore_rng, save_replay_buffer,
                              save_rng)
from prune_env.envs.factory import make_env
from prune_env.files import output_lock

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")


class Payload:
    """Unpickling this writes `marker` (what a planted file could do with any code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (self.marker, "payload ran")


def quick_overrides(tiny_data: dict, run_dir: Path) -> list[str]:
    return [f"env.data.text={tiny_data['text']}", f"env.data.facts={tiny_data['facts']}", f"run_dir={run_dir}",
            "algo.total_timesteps=12", "eval.every_steps=0", "eval.final=false", "checkpoint.every_steps=0",
            "logging.wandb=disabled", "logging.tensorboard=false", "logging.progress_bar=false"]


@pytest.fixture(scope="module")
def quick_run(tiny_data: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 12-step PPO run (one rollout): a final policy and one checkpoint."""
    run_dir = tmp_path_factory.mktemp("safety") / "run"
    assert train.main(["--config", SMOKE, *quick_overrides(tiny_data, run_dir)]) == 0
    return run_dir


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns(".prune-gym.lock"))
    return copy


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def poison_zip_data(path: Path, marker: Path) -> int:
    """Replace every cloudpickled entry of an SB3 zip's `data` with the payload; the number replaced."""
    with zipfile.ZipFile(path) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    data = json.loads(entries["data"])
    encoded = base64.b64encode(pickle.dumps(Payload(marker))).decode()
    poisoned = [key for key, value in data.items() if isinstance(value, dict) and ":serialized:" in value]
    for key in poisoned:
        data[key][":serialized:"] = encoded
    entries["data"] = json.dumps(data).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in entries.items():
            archive.writestr(name, content)
    return len(poisoned)


def test_the_payload_is_real(tmp_path: Path):
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.read_text() == "payload ran"


def test_policy_zip_data_entries_are_never_unpickled(quick_run: Path, tmp_path: Path):
    from stable_baselines3 import PPO

    run, marker = copy_run(quick_run, tmp_path), tmp_path / "marker"
    env = make_env(**read_run_config(run).env_kwargs(evaluation=True))
    clean = load_policy(run, env).model
    assert poison_zip_data(run / "final_model.zip", marker) >= 3  # policy_class, spaces, lr_schedule...
    loaded = load_policy(run, env).model
    assert not marker.exists()
    obs = np.random.default_rng(0).uniform(-3, 3, (64, 9)).astype(np.float32)
    assert np.array_equal(loaded.predict(obs, deterministic=True)[0], clean.predict(obs, deterministic=True)[0])
    assert loaded.num_timesteps == clean.num_timesteps == 12
    env.close()
    with pytest.raises(ValueError):  # SB3's own loader runs the payload (then fails on what it returned)
        PPO.load(run / "final_model.zip", device="cpu")
    assert marker.exists()


def test_pickled_vecnormalize_beside_a_policy_is_refused(quick_run: Path, tmp_path: Path, capsys):
    run, marker = copy_run(quick_run, tmp_path), tmp_path / "marker"
    (run / "vecnormalize.pkl").write_bytes(pickle.dumps(Payload(marker)))
    out = tmp_path / "alloc.json"
    assert train.main(["--eval", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "vecnormalize.pkl" in err and "--trust-pickle" in err and err.count("\n") == 1
    assert not marker.exists() and not out.exists()
    env = make_env(**read_run_config(run).env_kwargs())
    with pytest.raises(UnsafeFileError, match="pickle"):
        load_policy(run, env)
    env.close()
    assert not marker.exists()


def test_pickled_rng_state_in_a_checkpoint_is_refused_and_nothing_is_touched(quick_run: Path, tiny_data: dict,
                                                                             tmp_path: Path, capsys):
    run, marker = copy_run(quick_run, tmp_path), tmp_path / "marker"
    (checkpoint,) = [path for _, path in train.list_checkpoints(run / "checkpoints")]
    (checkpoint / "rng.safetensors").unlink()
    import torch

    torch.save({"python": Payload(marker)}, checkpoint / "rng.pt")
    before = snapshot(run)
    args = ["--config", SMOKE, *quick_overrides(tiny_data, run), "algo.total_timesteps=24", "--resume"]
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert "rng.pt" in err and "--trust-pickle" in err
    assert not marker.exists()
    after = snapshot(run)
    after.pop(".prune-gym.lock")
    assert after == before


def test_a_second_writer_of_a_run_folder_is_refused(quick_run: Path, tiny_data: dict, tmp_path: Path, capsys):
    run = copy_run(quick_run, tmp_path)
    before = snapshot(run)
    args = ["--config", SMOKE, *quick_overrides(tiny_data, run), "algo.total_timesteps=24", "--resume"]
    with output_lock(run, "run folder"):  # the first training, still running
        assert train.main(args) == 2
    err = capsys.readouterr().err
    assert "is in use by pid" in err and err.count("\n") == 1
    after = snapshot(run)
    after.pop(".prune-gym.lock")
    assert after == before


@pytest.mark.parametrize("overrides, message", [
    (["algo.hyperparams.n_steps=abc"], "hyperparams.n_steps='abc' is not an integer"),
    (["algo.hyperparams.learning_rate=-1"], "hyperparams.learning_rate=-1 is outside the allowed range (0, inf)"),
    (["algo.policy=FooPolicy"], "policy='FooPolicy' is not one of ['MlpPolicy', 'CnnPolicy', 'MultiInputPolicy']"),
    (["algo.policy_kwargs.activation_fn=foo"], "policy_kwargs.activation_fn='foo' is not one of ['tanh'"),
    (["algo.policy_kwargs.net_arch=x"], "policy_kwargs.net_arch='x' is not a list of layer sizes"),
    (["algo.policy_kwargs.optimizer_class=Adam"], "takes a Python object"),
    (["algo.hyperparams.buffer_size=10"], "unknown config key 'hyperparams.buffer_size' for PPO"),
    (["algo.device=tpu"], "device='tpu' is not a device torch knows"),
    (["env.device=tpu"], "env: device='tpu'"),
    (["env.data.calib_seed=-1"], "calib_seed=-1 is outside the allowed range"),
    (["algo.name=a2c"], "name='a2c' is not one of ['ppo', 'sac', 'dqn']"),
    (["algo.name=sac", "algo.hyperparams={}", "algo.hyperparams.tau=2"], "hyperparams.tau=2 is outside"),
])
def test_bad_values_are_refused_before_anything_is_created(overrides: list[str], message: str, tmp_path: Path,
                                                           capsys):
    run_dir = tmp_path / "new-run"
    assert train.main(["--config", SMOKE, *overrides, f"run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error:") and message in err and err.count("\n") == 1
    assert not run_dir.exists()


def test_an_unwritable_run_dir_is_refused_before_anything_is_created(tiny_data: dict, tmp_path: Path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert train.main(["--config", SMOKE, *quick_overrides(tiny_data, blocker / "run")]) == 2
    err = capsys.readouterr().err
    assert "run folder" in err and "not writable" in err and err.count("\n") == 1
    assert blocker.read_text() == "not a folder" and sorted(tmp_path.iterdir()) == [blocker]


def test_a_bad_model_name_leaves_no_run_folder(tiny_data: dict, tmp_path: Path, capsys):
    run_dir = tmp_path / "run"
    assert train.main(["--config", SMOKE, *quick_overrides(tiny_data, run_dir), "env.model=no-such-model"]) == 2
    assert "could not build the envs" in capsys.readouterr().err
    assert not run_dir.exists()


def test_eval_of_a_missing_policy_exits_2(tmp_path: Path, capsys):
    assert train.main(["--eval", str(tmp_path / "nowhere"), "--out", str(tmp_path / "a.json")]) == 2
    err = capsys.readouterr().err
    assert "no saved policy at" in err and err.count("\n") == 1
    assert sorted(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- the pickle-free files
def test_rng_states_round_trip(tmp_path: Path):
    import random

    import torch

    model = SimpleNamespace(action_space=gym.spaces.Box(-1, 1, (1,)))
    model.action_space.seed(3)
    save_rng(tmp_path / "rng.safetensors", model)
    draws = (random.random(), np.random.rand(), torch.rand(1).item(), model.action_space.sample().item())
    random.random(), np.random.rand(), torch.rand(3), model.action_space.sample()  # move every generator on
    restore_rng(tmp_path / "rng.safetensors", model)
    assert (random.random(), np.random.rand(), torch.rand(1).item(), model.action_space.sample().item()) == draws


def test_replay_buffer_round_trip(tmp_path: Path):
    from stable_baselines3.common.buffers import ReplayBuffer

    spaces = gym.spaces.Box(-5, 5, (9,), dtype=np.float32), gym.spaces.Box(-1, 1, (1,), dtype=np.float32)
    buffer, restored = ReplayBuffer(16, *spaces), ReplayBuffer(16, *spaces)
    rng = np.random.default_rng(0)
    for _ in range(20):  # wraps around: full, pos 4
        buffer.add(rng.normal(size=(1, 9)), rng.normal(size=(1, 9)), rng.normal(size=(1, 1)), rng.normal(size=1),
                   rng.random(1) < 0.3, [{}])
    save_replay_buffer(tmp_path / "buffer.safetensors", buffer)
    load_replay_buffer(tmp_path / "buffer.safetensors", restored)
    assert (restored.pos, restored.full) == (4, True)
    for name in ("observations", "next_observations", "actions", "rewards", "dones", "timeouts"):
        assert np.array_equal(getattr(restored, name), getattr(buffer, name)), name
    with pytest.raises(ValueError, match="does not match"):
        load_replay_buffer(tmp_path / "buffer.safetensors", ReplayBuffer(8, *spaces))


def test_vecnormalize_statistics_round_trip(tmp_path: Path):
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    venv = VecNormalize(DummyVecEnv([lambda: gym.make("Pendulum-v1")]), norm_obs=True, norm_reward=False)
    venv.seed(0)
    venv.reset()
    for _ in range(50):
        venv.step(np.array([[0.5]], dtype=np.float32))
    NormalizerStats.of(venv).save(tmp_path / "vecnormalize.json")
    stats = NormalizerStats.load(tmp_path / "vecnormalize.json")
    rewrapped = stats.wrap(DummyVecEnv([lambda: gym.make("Pendulum-v1")]))
    obs = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
    assert np.allclose(rewrapped.normalize_obs(obs), venv.normalize_obs(obs))
    assert np.allclose(stats.normalize_obs(obs), venv.normalize_obs(obs))


def test_a_policy_trained_on_another_device_plays_on_this_one(quick_run: Path, tmp_path: Path):
    import torch
    import yaml

    run = copy_run(quick_run, tmp_path)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["algo"]["device"] = saved["env"]["device"] = "cuda:7"  # a device this machine does not have
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    env = make_env(**read_run_config(run, ["env.device=cpu", "algo.device=cpu"]).env_kwargs())
    policy = load_policy(run, env, device="cpu")
    assert next(policy.model.policy.parameters()).device == torch.device("cpu")
    assert len(policy.rollout(env, seed=0)["allocation"]) == 3
    env.close()


def test_pickled_files_of_older_runs_load_only_with_trust_pickle(tmp_path: Path):
    import random

    import torch
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    from training.safe_load import load_normalizer, restore_legacy_rng

    venv = VecNormalize(DummyVecEnv([lambda: gym.make("Pendulum-v1")]), norm_obs=True, norm_reward=False)
    venv.reset()
    venv.save(str(tmp_path / "vecnormalize.pkl"))  # what older train.py runs hold
    with pytest.raises(UnsafeFileError, match="--trust-pickle"):
        load_normalizer(tmp_path)
    with pytest.warns(UserWarning, match="trust_pickle"):
        stats = load_normalizer(tmp_path, trust_pickle=True)
    assert stats.obs_mean == venv.obs_rms.mean.tolist()

    model = SimpleNamespace(action_space=gym.spaces.Box(-1, 1, (1,)))
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "action_space": model.action_space.np_random.bit_generator.state}, tmp_path / "rng.pt")
    draw = random.random(), np.random.rand(), torch.rand(1).item()
    with pytest.raises(UnsafeFileError):
        restore_legacy_rng(tmp_path / "rng.pt", model, trust_pickle=False)
    with pytest.warns(UserWarning, match="trust_pickle"):
        restore_legacy_rng(tmp_path / "rng.pt", model, trust_pickle=True)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draw


# ----------------------------------------------------------------------------- issue #24, round two
def test_an_empty_config_file_is_refused_not_the_default_run(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default run_dir would be runs/empty-0 here
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    assert train.main(["--config", "empty.yaml"]) == 2
    err = capsys.readouterr().err
    assert "config file 'empty.yaml' is empty" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.yaml"]


def test_n_envs_beyond_the_cores_is_refused_before_any_env_with_little_memory(tiny_data: dict, tmp_path: Path):
    """n_envs=20000 built envs until it was killed (1.1 GB after 60 s); now one line, exit 2."""
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    args = ["--config", SMOKE, *quick_overrides(tiny_data, run_dir), "algo.n_envs=20000"]
    # VmHWM, not ru_maxrss: a vfork'd child's ru_maxrss starts at its parent's peak (here the whole test session's)
    probe = ("import re, sys, train; code = train.main(sys.argv[1:]); "
             "print(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read())[1]); sys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", probe, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if line.startswith("train.py")]
    assert len(err) == 1 and "algo.n_envs=20000 is more than 8 envs per CPU core" in err[0]
    assert int(proc.stdout.split()[-1]) < 2 * 1024 * 1024  # KiB: peak RSS under 2 GB
    assert not run_dir.exists()


def test_n_envs_are_counted_against_memory(tmp_path: Path):
    from prune_env.config_files import ConfigError

    mib, gib = 2**20, 2**30
    train.check_vec_env_size(4, False, 540 * mib, cpus=2, available=8 * gib)  # SmolLM2-sized, in one process
    with pytest.raises(ConfigError, match=r"algo.n_envs=16 needs about 9.5 GiB \(572 MiB per env for a 540 MiB "
                                          r"model\) but 8.0 GiB are available: lower algo.n_envs$"):
        train.check_vec_env_size(16, False, 540 * mib, cpus=2, available=8 * gib)
    with pytest.raises(ConfigError, match="in its own process.*or use algo.vec_env=dummy"):
        train.check_vec_env_size(4, True, 540 * mib, cpus=2, available=6 * gib)
    with pytest.raises(ConfigError, match=r"\(2 cores here: at most 16\)"):
        train.check_vec_env_size(17, False, 0, cpus=2, available=1000 * gib)


@pytest.mark.parametrize("value", ["../../escape", "/tmp/escape", "a/../../escape", "."])
def test_checkpoint_dir_is_confined_to_the_run_folder(value: str, tiny_data: dict, tmp_path: Path, capsys):
    run_dir = tmp_path / "a" / "b" / "run"
    assert train.main(["--config", SMOKE, *quick_overrides(tiny_data, run_dir), f"checkpoint.dir={value}"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint: dir={value!r} must be a folder inside run_dir" in err and err.count("\n") == 1
    assert sorted(tmp_path.iterdir()) == []


def _tamper_policy_entry(path: Path) -> None:
    with zipfile.ZipFile(path) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    entries["policy.pth"] = entries["policy.pth"][:200]  # cut short: torch cannot read it
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in entries.items():
            archive.writestr(name, content)


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


YAML_TAG = "run_dir: !!python/object/apply:os.system ['touch {marker}']\n"
CORRUPTIONS = {  # name -> (damage(run, checkpoint, marker), the file the message names)
    "state.json not JSON": (lambda r, c, m: (c / "state.json").write_text("{garbage"), "state.json': not JSON"),
    "state.json a list": (lambda r, c, m: (c / "state.json").write_text("[1, 2]"), "state.json': a list"),
    "state.json wrong types": (lambda r, c, m: (c / "state.json").write_text(json.dumps(
        {**json.loads((c / "state.json").read_text()), "eval_history": 5})), "state.json': eval_history is not"),
    "state.json without counters": (lambda r, c, m: (c / "state.json").write_text("{}"), "seed is missing"),
    "config.yaml binary": (lambda r, c, m: (r / "config.yaml").write_bytes(b"\x00\xff: ["),
                           "config.yaml' is not UTF-8"),
    "config.yaml a list": (lambda r, c, m: (r / "config.yaml").write_text("[1, 2]\n"), "config.yaml' must hold"),
    "config.yaml YAML tag": (lambda r, c, m: (r / "config.yaml").write_text(YAML_TAG.format(marker=m)),
                             "config.yaml' is not valid YAML"),
    "checkpoints a file": (lambda r, c, m: (shutil.rmtree(r / "checkpoints"), (r / "checkpoints").write_text("x")),
                           "checkpoints' is a file, not a folder"),
    "checkpoints a link out": (lambda r, c, m: (shutil.rmtree(r / "checkpoints"),
                                                (r / "checkpoints").symlink_to(m.parent, target_is_directory=True)),
                               "outside the run folder"),
    "step folder without state": (lambda r, c, m: (c / "state.json").unlink(), "is not a complete checkpoint"),
    "rng.safetensors header cut": (lambda r, c, m: _truncate(c / "rng.safetensors", 100),
                                   "rng.safetensors' is damaged"),
    "rng.safetensors data cut": (lambda r, c, m: _truncate(c / "rng.safetensors", (c / "rng.safetensors").stat().st_size
                                                           - 50), "rng.safetensors' is damaged"),
    "model.zip tampered .pth": (lambda r, c, m: _tamper_policy_entry(c / "model.zip"),
                                "model.zip' has a damaged or tampered tensor entry"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_a_damaged_run_folder_is_refused_in_one_line_and_left_as_it_was(name: str, quick_run: Path, tiny_data: dict,
                                                                       tmp_path: Path, capsys):
    """Each once ended in a traceback (some without the file name); a `checkpoints` file trained from scratch first."""
    run, marker = copy_run(quick_run, tmp_path), tmp_path / "marker"
    (checkpoint,) = [path for _, path in train.list_checkpoints(run / "checkpoints")]
    damage, message = CORRUPTIONS[name]
    damage(run, checkpoint, marker)
    before = snapshot(run)
    args = ["--config", SMOKE, *quick_overrides(tiny_data, run), "algo.total_timesteps=24", "--resume"]
    assert train.main(args) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.err.count("\n") == 1 and captured.err.startswith("train.py: error:")
    assert "from scratch" not in captured.out and not marker.exists()
    after = snapshot(run)
    after.pop(".prune-gym.lock", None)
    assert after == before


@pytest.mark.parametrize("name", ["config.yaml YAML tag", "model.zip tampered .pth", "vecnormalize.json NaN"])
def test_eval_of_a_damaged_policy_is_one_line_exit_2(name: str, quick_run: Path, tmp_path: Path, capsys):
    run, marker, out = copy_run(quick_run, tmp_path), tmp_path / "marker", tmp_path / "alloc.json"
    if name == "config.yaml YAML tag":
        (run / "config.yaml").write_text(YAML_TAG.format(marker=marker))
    elif name == "model.zip tampered .pth":
        _tamper_policy_entry(run / "final_model.zip")
    else:
        stats = {"obs_mean": [0.0] * 9, "obs_var": [float("nan")] * 9, "obs_count": 3.0, "ret_mean": 0.0,
                 "ret_var": 1.0, "ret_count": 1.0, "clip_obs": 10.0, "clip_reward": 10.0, "gamma": 0.99,
                 "epsilon": 1e-8, "norm_obs": True, "norm_reward": False}
        (run / "vecnormalize.json").write_text(json.dumps(stats))
    assert train.main(["--eval", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error:") and err.count("\n") == 1 and str(run) in err
    assert not marker.exists() and not out.exists()


def test_a_surrogate_data_set_with_nan_is_refused_before_anything_is_created(tmp_path: Path, capsys):
    data = tmp_path / "set.jsonl"
    header = {"format": "prune-gym-surrogate", "version": 1, "context": {"model": "tiny-llama"},
              "dense": {"ppl": 20.0, "fact_acc": 0.5}, "unit_numel": [10, 10, 10]}
    record = {"draw": 0, "allocation": [0.5] * 3, "ppl": float("nan"), "fact_acc": 0.4, "fact_nll": 1.0,
              "fact_retention": 0.8}
    data.write_text(json.dumps(header) + "\n" + json.dumps(record) + "\n")
    run_dir = tmp_path / "run"
    assert train.main(["--config", SMOKE, "env.fidelity=surrogate", f"env.surrogate={data}", f"run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert f"env.surrogate: {data}:2: field 'ppl' is NaN" in err and err.count("\n") == 1
    assert not run_dir.exists()
