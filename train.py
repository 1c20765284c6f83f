"""Train a Stable-Baselines3 agent (PPO, SAC or DQN) on LayerPrune-v0.

    python train.py                                         # configs/ppo.yaml: PPO on smollm2-135m
    python train.py --config configs/sac.yaml env.target_sparsity=0.6 algo.total_timesteps=20000
    python train.py --config configs/ppo.yaml --resume      # continue from run_dir's latest checkpoint
    python train.py --config configs/smoke.yaml --print-config
    python train.py --eval runs/ppo-0/final_model.zip [--out alloc.json] [eval.data.n_facts=100]

Training runs on the cheap `proxy` fidelity; every `eval.every_steps` steps a separate `exact` env
plays one deterministic episode of the current policy. Its reward, ppl, fact_acc, fact_retention and
achieved sparsity go to TensorBoard (run_dir/tensorboard), wandb (offline by default: run_dir/wandb,
`wandb sync` later), run_dir/eval.jsonl and the console.

Run folder (run_dir, default runs/<config name>-<seed>):

    config.yaml                 resolved config (every key), written at start
    final_model.zip             the trained policy (SB3 format), vecnormalize.pkl beside it if used
    eval.jsonl                  one line per exact evaluation
    tensorboard/<ALGO>_1/       SB3 TensorBoard events (train/*, rollout/*, eval/*)
    wandb/                      offline wandb run(s)
    checkpoints/step_<N>/       model.zip (policy + optimizer), replay_buffer.pkl (SAC/DQN),
                                vecnormalize.pkl (if used), rng.pt (python/numpy/torch/action-space RNG),
                                state.json (num_timesteps, eval history, wandb id; written last)

A checkpoint is written into checkpoints/.tmp-step_<N>-<pid>/ and renamed into place only when
complete, so a kill -9 at any moment leaves the previous checkpoints intact; --resume loads the
highest complete step_<N> and ignores (and removes) unfinished .tmp-* folders. Checkpoints and
evaluations are taken at safe points: checkpoints at the first rollout boundary after every
`checkpoint.every_steps` steps (the policy has been updated on everything counted in num_timesteps),
evaluations at the first episode boundary after `eval.every_steps` (the eval env shares the model
weights with in-process training envs).

Exit status: 0 done, 2 bad command line / config key or value (message on stderr), 130 interrupted.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from stable_baselines3.common.logger import KVWriter

from agents.rl import (
    ALGO_NAMES,
    CONFIG_NAME,
    FINAL_MODEL,
    VECNORMALIZE,
    RLPolicyAgent,
    algo_class,
    env_kwargs,
    eval_env_kwargs,
    make_env,
    play_episode,
)
from prune_env.config import ConfigError, is_finite_number, is_int, load_config
from prune_env.context import GRANULARITIES, DataConfig
from prune_env.env import ACTION_TYPES, FIDELITIES
from prune_env.masking import METHODS, parse_pattern
from prune_env.rewards import RewardConfig

ROOT = Path(__file__).resolve().parent
DEFAULT_CONFIG = ROOT / "configs" / "ppo.yaml"
WANDB_MODES = ("offline", "online", "disabled")
VEC_ENVS = ("dummy", "subproc")
DTYPES = ("float32", "bfloat16", "float16")
ACTIVATIONS = {"tanh": "Tanh", "relu": "ReLU", "elu": "ELU", "leaky_relu": "LeakyReLU", "gelu": "GELU",
               "silu": "SiLU"}
# Set by train.py itself, never through algo.hyperparams.
RESERVED_HYPERPARAMS = {"self", "policy", "env", "seed", "tensorboard_log", "policy_kwargs", "verbose", "device",
                        "_init_setup_model"}
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
EVAL_METRICS = ("reward", "quality", "ppl", "fact_acc", "fact_nll", "fact_retention", "achieved_sparsity")

# Every valid key with its default. An empty dict is a free-form mapping.
DEFAULTS: dict[str, Any] = {
    "env": {  # kwargs of LayerPrune-v0 (see prune_env/env.py)
        "model": "smollm2-135m",
        "target_sparsity": 0.5,
        "granularity": "block",
        "method": "wanda",
        "pattern": None,
        "min_sparsity": 0.0,
        "max_sparsity": 0.9,
        "action_type": "continuous",
        "n_actions": 11,
        "fidelity": "proxy",
        "reward": asdict(RewardConfig()),
        "data": asdict(DataConfig()),
        "proxy_eval_tokens": 1024,
        "proxy_facts": 64,
        "device": "cpu",
        "dtype": "float32",
    },
    "algo": {
        "name": "ppo",
        "total_timesteps": 24000,
        "seed": 0,
        "n_envs": 1,
        "vec_env": "dummy",
        "policy": "MlpPolicy",
        "policy_kwargs": {},
        "hyperparams": {},
        "normalize_obs": False,  # VecNormalize on observations (stats saved with checkpoints / final model)
        "device": "cpu",  # where the policy network trains
        "torch_threads": None,  # None: torch's default; 1 is far faster for tiny models on shared cores
    },
    "eval": {
        "every_steps": 2400,  # 0: only the final evaluation (if final: true)
        "fidelity": "exact",
        "data": {},  # DataConfig overrides for the evaluation env, over env.data
        "final": True,  # evaluate once more at the end of training
    },
    "checkpoint": {
        "every_steps": 2400,  # 0: only the final checkpoint
        "dir": "checkpoints",  # relative to run_dir
        "keep": 3,  # most recent checkpoints kept
    },
    "logging": {
        "wandb": "offline",
        "project": "prune-gym",
        "tensorboard": True,
        "progress_bar": True,
        "verbose": 0,  # SB3 verbosity (1 also prints SB3's tables)
    },
    "run_dir": None,  # None: runs/<config name>-<seed>
}


class SimulatedFailure(RuntimeError):
    """Raised by tests to interrupt training at a chosen step."""


# ----------------------------------------------------------------------------- config
def _get(config: dict, dotted: str) -> Any:
    node = config
    for key in dotted.split("."):
        node = node[key]
    return node


def _check_int(config: dict, dotted: str, minimum: int, allow_none: bool = False) -> None:
    value = _get(config, dotted)
    if allow_none and value is None:
        return
    if not is_int(value) or value < minimum:
        raise ConfigError(f"{dotted} must be an integer >= {minimum}, got {value!r}")


def _check_choice(config: dict, dotted: str, choices) -> None:
    value = _get(config, dotted)
    if value not in choices:
        raise ConfigError(f"{dotted} must be one of {', '.join(map(str, choices))}, got {value!r}")


def _check_bool(config: dict, dotted: str) -> None:
    if not isinstance(_get(config, dotted), bool):
        raise ConfigError(f"{dotted} must be true or false, got {_get(config, dotted)!r}")


def _check_data(data: dict, where: str, partial: bool = False) -> None:
    known = {f.name: f for f in fields(DataConfig)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown config key(s) {[f'{where}.{k}' for k in unknown]}: valid keys are {sorted(known)}")
    for key, value in data.items():
        if key in ("text", "facts"):
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{where}.{key} must be a source name or a file path, got {value!r}")
            looks_like_file = "/" in value or value.endswith((".txt", ".jsonl", ".json"))
            if looks_like_file and not Path(value).expanduser().is_file():
                raise ConfigError(f"{where}.{key}: file {value!r} does not exist")
        elif key == "eval_offset":
            if value is not None and (not is_int(value) or value < 0):
                raise ConfigError(f"{where}.eval_offset must be null or an integer >= 0, got {value!r}")
        else:
            minimum = 1 if key in ("calib_samples", "calib_seq_len", "eval_tokens", "eval_seq_len", "batch_size",
                                   "fact_batch_size") else 0
            if not is_int(value) or value < minimum:
                raise ConfigError(f"{where}.{key} must be an integer >= {minimum}, got {value!r}")
    if not partial:
        DataConfig(**data)


def validate(config: dict) -> dict:
    """Check every value that can be checked without loading a model; raise ConfigError."""
    env = config["env"]
    if not isinstance(env["model"], str) or not env["model"]:
        raise ConfigError(f"env.model must be a model alias, folder, .gguf file or hub id, got {env['model']!r}")
    for key in ("target_sparsity", "min_sparsity", "max_sparsity"):
        if not is_finite_number(env[key]):
            raise ConfigError(f"env.{key} must be a number, got {env[key]!r}")
    if not 0.0 < env["target_sparsity"] < 1.0:
        raise ConfigError(f"env.target_sparsity must be in (0, 1), got {env['target_sparsity']!r}")
    if not 0.0 <= env["min_sparsity"] <= env["max_sparsity"] < 1.0:
        raise ConfigError(f"need 0 <= env.min_sparsity <= env.max_sparsity < 1, got {env['min_sparsity']} and "
                          f"{env['max_sparsity']}")
    if not env["min_sparsity"] <= env["target_sparsity"] <= env["max_sparsity"]:
        raise ConfigError(f"env.target_sparsity {env['target_sparsity']} is outside [env.min_sparsity, "
                          f"env.max_sparsity] = [{env['min_sparsity']}, {env['max_sparsity']}]")
    _check_choice(config, "env.granularity", GRANULARITIES)
    _check_choice(config, "env.method", METHODS)
    _check_choice(config, "env.fidelity", FIDELITIES)
    _check_choice(config, "env.action_type", ACTION_TYPES)
    _check_choice(config, "env.dtype", DTYPES)
    if env["pattern"] is not None:
        if not isinstance(env["pattern"], str):  # YAML 1.1 reads an unquoted 2:4 as the base-60 number 124
            raise ConfigError(f"env.pattern must be null or a string such as '2:4' (quote it), got {env['pattern']!r}")
        try:
            parse_pattern(env["pattern"])
        except ValueError as error:
            raise ConfigError(f"env.pattern: {error}") from None
    _check_int(config, "env.n_actions", 2)
    _check_int(config, "env.proxy_eval_tokens", 1)
    _check_int(config, "env.proxy_facts", 1)
    if not isinstance(env["device"], str):
        raise ConfigError(f"env.device must be a string such as 'cpu' or 'cuda', got {env['device']!r}")
    try:
        RewardConfig.from_dict(env["reward"])
    except (TypeError, ValueError) as error:
        raise ConfigError(f"env.reward: {error}") from None
    _check_data(env["data"], "env.data")

    algo = config["algo"]
    _check_choice(config, "algo.name", ALGO_NAMES)
    _check_int(config, "algo.total_timesteps", 1)
    _check_int(config, "algo.seed", 0)
    _check_int(config, "algo.n_envs", 1)
    _check_choice(config, "algo.vec_env", VEC_ENVS)
    _check_bool(config, "algo.normalize_obs")
    _check_int(config, "algo.torch_threads", 1, allow_none=True)
    if not isinstance(algo["policy"], str):
        raise ConfigError(f"algo.policy must be an SB3 policy name such as 'MlpPolicy', got {algo['policy']!r}")
    if algo["n_envs"] > 1 and algo["vec_env"] != "subproc":
        raise ConfigError(f"algo.n_envs={algo['n_envs']} needs algo.vec_env=subproc: envs in one process share one "
                          "copy of the model weights, so they cannot prune it side by side")
    if algo["name"] == "dqn" and env["action_type"] != "discrete":
        raise ConfigError("algo.name=dqn needs env.action_type=discrete (DQN acts in a Discrete space)")
    if algo["name"] == "sac" and env["action_type"] != "continuous":
        raise ConfigError("algo.name=sac needs env.action_type=continuous (SAC acts in a Box space)")
    for key in ("policy_kwargs", "hyperparams"):
        if algo[key] is None:
            algo[key] = {}
        if not isinstance(algo[key], dict):
            raise ConfigError(f"algo.{key} must be a mapping, got {algo[key]!r}")
    import inspect

    cls = algo_class(algo["name"])
    valid = [p for p in inspect.signature(cls.__init__).parameters if p not in RESERVED_HYPERPARAMS]
    for key in algo["hyperparams"]:
        if key in RESERVED_HYPERPARAMS:
            raise ConfigError(f"algo.hyperparams.{key} is set by train.py: use algo.{key} instead"
                              if key in algo else f"algo.hyperparams.{key} cannot be set")
        if key not in valid:
            raise ConfigError(f"unknown config key 'algo.hyperparams.{key}' for {cls.__name__}: valid keys are "
                              f"{sorted(valid)}")
    activation = algo["policy_kwargs"].get("activation_fn")
    if activation is not None and activation not in ACTIVATIONS:
        raise ConfigError(f"algo.policy_kwargs.activation_fn must be one of {', '.join(ACTIVATIONS)}, got "
                          f"{activation!r}")

    evaluation = config["eval"]
    _check_int(config, "eval.every_steps", 0)
    _check_choice(config, "eval.fidelity", FIDELITIES)
    _check_bool(config, "eval.final")
    if evaluation["data"] is None:
        evaluation["data"] = {}
    if not isinstance(evaluation["data"], dict):
        raise ConfigError(f"eval.data must be a mapping of data overrides, got {evaluation['data']!r}")
    _check_data(evaluation["data"], "eval.data", partial=True)

    _check_int(config, "checkpoint.every_steps", 0)
    _check_int(config, "checkpoint.keep", 1)
    if not isinstance(config["checkpoint"]["dir"], str) or not config["checkpoint"]["dir"]:
        raise ConfigError(f"checkpoint.dir must be a folder name, got {config['checkpoint']['dir']!r}")

    _check_choice(config, "logging.wandb", WANDB_MODES)
    _check_bool(config, "logging.tensorboard")
    _check_bool(config, "logging.progress_bar")
    _check_int(config, "logging.verbose", 0)
    if not isinstance(config["logging"]["project"], str) or not config["logging"]["project"]:
        raise ConfigError(f"logging.project must be a name, got {config['logging']['project']!r}")
    if config["run_dir"] is not None and (not isinstance(config["run_dir"], str) or not config["run_dir"]):
        raise ConfigError(f"run_dir must be a folder path, got {config['run_dir']!r}")
    return config


def resolve_config(path: str | Path | None, overrides: list[str] | None = None) -> dict:
    """DEFAULTS <- YAML <- overrides, validated, with run_dir filled in."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    config = validate(load_config(path, overrides, DEFAULTS))
    if config["run_dir"] is None:
        config["run_dir"] = str(Path("runs") / f"{path.stem}-{config['algo']['seed']}")
    return config


def _flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _differences(old: dict, new: dict) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))


# ----------------------------------------------------------------------------- files
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for item in path.iterdir():
        if item.is_file():
            with item.open("rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(path)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that readers see the old or the new content, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    with partial.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    _fsync_dir(path.parent)


def _step_of(path: Path) -> int | None:
    if not path.name.startswith(STEP_PREFIX):
        return None
    try:
        return int(path.name[len(STEP_PREFIX):])
    except ValueError:
        return None


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (a step_N folder only exists once it is complete)."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for path in ckpt_dir.iterdir():
        step = _step_of(path)
        if step is not None and path.is_dir() and (path / "state.json").is_file() and (path / "model.zip").is_file():
            found.append((step, path))
    return sorted(found)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(ckpt_dir)
    return checkpoints[-1][1] if checkpoints else None


def remove_partial_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Unfinished checkpoint folders left by a killed run."""
    removed = []
    if ckpt_dir.is_dir():
        for path in ckpt_dir.iterdir():
            if path.name.startswith(TMP_PREFIX):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def rng_state(model) -> dict:
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    space_rng = getattr(model.action_space, "_np_random", None)
    if space_rng is not None:
        state["action_space"] = space_rng.bit_generator.state
    return state


def restore_rng(state: dict, model) -> None:
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "action_space" in state:
        model.action_space.np_random.bit_generator.state = state["action_space"]


def save_checkpoint(ckpt_dir: Path, model, state: dict, vec_normalize=None, keep: int = 3) -> Path:
    """Write checkpoints/step_<N>/ atomically (tmp folder + rename); keep the `keep` most recent."""
    import torch

    step = int(model.num_timesteps)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"{STEP_PREFIX}{step:010d}"
    tmp = ckpt_dir / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    model.save(tmp / "model.zip")
    files = ["model.zip"]
    if hasattr(model, "replay_buffer") and model.replay_buffer is not None:
        model.save_replay_buffer(tmp / "replay_buffer.pkl")
        files.append("replay_buffer.pkl")
    if vec_normalize is not None:
        vec_normalize.save(str(tmp / VECNORMALIZE))
        files.append(VECNORMALIZE)
    torch.save(rng_state(model), tmp / "rng.pt")
    files.append("rng.pt")
    record = {**state, "num_timesteps": step, "files": files + ["state.json"], "saved_at": time.time()}
    (tmp / "state.json").write_text(json.dumps(record, indent=1))  # last: its presence marks completeness
    _fsync_tree(tmp)
    if final.exists():  # the same step saved again (e.g. the final checkpoint): swap it
        old = ckpt_dir / f"{TMP_PREFIX}old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_dir(ckpt_dir)
    for _, path in list_checkpoints(ckpt_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def load_checkpoint_state(path: Path) -> tuple[dict, dict]:
    import torch

    state = json.loads((path / "state.json").read_text())
    rng = torch.load(path / "rng.pt", weights_only=False)
    return state, rng


# ----------------------------------------------------------------------------- logging / console
class WandbWriter(KVWriter):
    """An SB3 logger output format that forwards numeric values to a wandb run."""

    def __init__(self, run):
        self.run = run

    def write(self, key_values: dict, key_excluded: dict, step: int = 0) -> None:
        data = {}
        for key, value in key_values.items():
            excluded = key_excluded.get(key) or ()
            if "wandb" in excluded:
                continue
            if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
                value = value.item()
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                data[key] = value
        if data:
            self.run.log(data, step=int(step))

    def close(self) -> None:
        pass


def start_wandb(config: dict, run_dir: Path, run_id: str | None):
    mode = config["logging"]["wandb"]
    if mode == "disabled":
        return None
    os.environ["WANDB_MODE"] = mode
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ["WANDB_DIR"] = str(run_dir)
    import wandb

    settings = wandb.Settings(console="off", x_disable_stats=True)
    return wandb.init(project=config["logging"]["project"], name=run_dir.name, dir=str(run_dir), config=config,
                      id=run_id, resume="allow", mode=mode, settings=settings)


def format_metrics(record: dict) -> str:
    return (f"exact reward {record['reward']:+.4f}  ppl {record['ppl']:.2f} (dense {record['dense_ppl']:.2f})  "
            f"fact_acc {record['fact_acc']:.3f}  retention {record['fact_retention']:.3f}  "
            f"sparsity {record['achieved_sparsity']:.3f}")


class ProgressDisplay:
    """A rich progress bar over timesteps with the latest exact metrics beside it."""

    def __init__(self, enabled: bool):
        from rich.console import Console

        self.console = Console()
        self.enabled = enabled and self.console.is_terminal  # in logs the eval lines say enough
        self.progress = None
        self.task = None

    def start(self, total: int, completed: int) -> None:
        if not self.enabled or self.progress is not None:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[metrics]}"), console=self.console)
        self.task = self.progress.add_task("train", total=total, completed=completed, metrics="")
        self.progress.start()

    def update(self, completed: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=completed)

    def show(self, step: int, record: dict) -> None:
        line = format_metrics(record)
        if self.progress is not None:
            self.progress.update(self.task, metrics=f"exact@{step}: R {record['reward']:+.4f} ppl {record['ppl']:.2f} "
                                                    f"fact {record['fact_acc']:.3f}")
        self.console.print(f"eval @ {step}: {line}", highlight=False, markup=False, soft_wrap=True)

    def print(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False, soft_wrap=True)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


# ----------------------------------------------------------------------------- callback
def _make_callback_class():
    from stable_baselines3.common.callbacks import BaseCallback

    class TrainingCallback(BaseCallback):
        """Periodic exact evaluation, checkpoints, wandb/TensorBoard metrics and the progress bar.

        Its state (counters, eval history, wandb id) is saved in each checkpoint's state.json.
        """

        def __init__(self, *, config: dict, run_dir: Path, eval_env, state: dict, progress: ProgressDisplay,
                     wandb_run=None, vec_normalize=None, in_process_envs: bool = True):
            super().__init__(verbose=0)
            self.config, self.run_dir, self.eval_env = config, run_dir, eval_env
            self.state = state
            self.progress, self.wandb_run, self.vec_normalize = progress, wandb_run, vec_normalize
            self.in_process_envs = in_process_envs
            self.eval_every = config["eval"]["every_steps"]
            self.ckpt_every = config["checkpoint"]["every_steps"]
            self.ckpt_dir = run_dir / config["checkpoint"]["dir"]
            self.eval_path = run_dir / "eval.jsonl"

        # -- hooks
        def _on_training_start(self) -> None:
            if self.wandb_run is not None:
                self.model.logger.output_formats.append(WandbWriter(self.wandb_run))
            self.progress.start(self.config["algo"]["total_timesteps"], self.num_timesteps)

        def _on_rollout_start(self) -> None:
            # Rollout boundary: the policy has been trained on every step counted so far.
            last = self.state["last_checkpoint_step"]
            if self.ckpt_every and self.num_timesteps // self.ckpt_every > last // self.ckpt_every:
                self.checkpoint()

        def _on_step(self) -> bool:
            self.progress.update(self.num_timesteps)
            last = self.state["last_eval_step"]
            due = self.eval_every and self.num_timesteps // self.eval_every > last // self.eval_every
            if self.config["eval"]["final"] and self.num_timesteps >= self.config["algo"]["total_timesteps"]:
                due = False  # the last update comes after this step: finish() evaluates the final policy
            if due and self.eval_env is not None and self._at_episode_boundary():
                self.evaluate()
            return True

        def _on_training_end(self) -> None:
            self.finish()

        # -- actions
        def _at_episode_boundary(self) -> bool:
            if not self.in_process_envs:
                return True
            dones = self.locals.get("dones")
            return dones is None or bool(np.all(dones))

        def finish(self) -> None:
            """Final evaluation and checkpoint (idempotent)."""
            self.num_timesteps = int(self.model.num_timesteps)
            if (self.eval_env is not None and self.config["eval"]["final"]
                    and self.state["last_eval_step"] != self.num_timesteps):
                self.evaluate()
            if self.state["last_checkpoint_step"] != self.num_timesteps or not list_checkpoints(self.ckpt_dir):
                self.checkpoint()
            self.progress.update(self.num_timesteps)
            self.progress.stop()

        def evaluate(self) -> dict:
            step = int(self.num_timesteps)
            result = play_episode(self.model, self.eval_env, train_fidelity=self.config["env"]["fidelity"],
                                  normalizer=self.vec_normalize, seed=self.config["algo"]["seed"])
            self.eval_env.unwrapped.ctx.restore()  # the weights are shared with in-process training envs
            record = {"step": step, **result, "time": time.time()}
            self.state["eval_history"].append(record)
            self.state["last_eval_step"] = step
            with self.eval_path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            for key in EVAL_METRICS:
                self.logger.record(f"eval/{key}", record[key])
            self.logger.record("eval/seconds", record["seconds"])
            self.logger.dump(step)
            self.progress.show(step, record)
            return record

        def checkpoint(self) -> Path:
            self.state["last_checkpoint_step"] = int(self.num_timesteps)
            path = save_checkpoint(self.ckpt_dir, self.model, self.state, self.vec_normalize,
                                   self.config["checkpoint"]["keep"])
            return path

    return TrainingCallback


# ----------------------------------------------------------------------------- training
def _policy_kwargs(config: dict) -> dict:
    kwargs = copy.deepcopy(config["algo"]["policy_kwargs"])
    if "activation_fn" in kwargs:
        import torch.nn as nn

        kwargs["activation_fn"] = getattr(nn, ACTIVATIONS[kwargs["activation_fn"]])
    return kwargs


def _hyperparams(config: dict) -> dict:
    params = copy.deepcopy(config["algo"]["hyperparams"])
    if isinstance(params.get("train_freq"), list):
        params["train_freq"] = tuple(params["train_freq"])
    return params


def _build_env(factory, what: str):
    try:
        return factory()
    except (ValueError, FileNotFoundError, OSError, ConfigError) as error:
        raise ConfigError(f"could not build the {what} env: {error}") from error


def _check_resume_config(saved: dict, config: dict) -> list[str]:
    """Keys that must not change on resume raise; the others are returned (they take effect)."""
    changed = _differences(saved, config)
    fixed = [k for k in changed if k.startswith(("env.", "algo.name", "algo.policy", "algo.normalize_obs"))]
    if fixed:
        raise ConfigError(f"--resume: the config differs from the run's {CONFIG_NAME} in {fixed}; these cannot change "
                          "in a resumed run (start a new run_dir instead)")
    return changed


def train(config: dict, resume: bool = False, extra_callbacks: tuple = ()) -> dict:
    """Train (or resume) as the config says; returns a summary. Raises ConfigError for bad input."""
    run_dir = Path(config["run_dir"])
    ckpt_dir = run_dir / config["checkpoint"]["dir"]
    algo = config["algo"]
    latest = latest_checkpoint(ckpt_dir)
    if not resume and (latest is not None or (run_dir / FINAL_MODEL).exists()):
        raise ConfigError(f"run_dir {str(run_dir)!r} already holds a run: pass --resume to continue it, or set "
                          "run_dir=... for a new one")
    display = ProgressDisplay(config["logging"]["progress_bar"])
    changed: list[str] = []
    if resume and (run_dir / CONFIG_NAME).is_file():
        changed = _check_resume_config(yaml.safe_load((run_dir / CONFIG_NAME).read_text()), config)
    for path in remove_partial_checkpoints(ckpt_dir):
        display.print(f"removed unfinished checkpoint {path}")
    if resume:
        if latest is None:
            display.print(f"--resume: no checkpoint in {ckpt_dir}, starting from scratch")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / CONFIG_NAME, yaml.safe_dump(config, sort_keys=False))

    import torch
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.utils import set_random_seed
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecNormalize

    if algo["torch_threads"] is not None:
        torch.set_num_threads(algo["torch_threads"])
    set_random_seed(algo["seed"])
    cls = algo_class(algo["name"])
    state = {"algo": algo["name"], "seed": algo["seed"], "last_eval_step": 0, "last_checkpoint_step": 0,
             "eval_history": [], "wandb_id": None, "started_at": time.time()}
    rng = None
    if latest is not None:
        state, rng = load_checkpoint_state(latest)
        if state.get("algo") != algo["name"]:
            raise ConfigError(f"checkpoint {latest} was made by {state.get('algo')!r}, the config says {algo['name']!r}")
        # eval.jsonl may hold evaluations made after this checkpoint: keep only the checkpoint's history
        atomic_write_text(run_dir / "eval.jsonl", "".join(json.dumps(r) + "\n" for r in state["eval_history"]))
    elif (run_dir / "eval.jsonl").exists():
        (run_dir / "eval.jsonl").unlink()

    evaluating = config["eval"]["every_steps"] > 0 or config["eval"]["final"]
    eval_env = _build_env(lambda: make_env(**eval_env_kwargs(config)), "evaluation") if evaluating else None
    subproc = algo["vec_env"] == "subproc" and algo["n_envs"] > 1
    vec_env = _build_env(lambda: make_vec_env(make_env, n_envs=algo["n_envs"], seed=algo["seed"],
                                              env_kwargs={**env_kwargs(config),
                                                          "torch_threads": algo["torch_threads"]},
                                              vec_env_cls=SubprocVecEnv if subproc else DummyVecEnv), "training")
    wandb_run = None
    try:
        vec_normalize = None
        if algo["normalize_obs"]:
            saved_stats = latest / VECNORMALIZE if latest is not None else None
            if saved_stats is not None and saved_stats.is_file():
                vec_env = vec_normalize = VecNormalize.load(str(saved_stats), vec_env)
            else:
                vec_env = vec_normalize = VecNormalize(vec_env, norm_obs=True, norm_reward=False)
        tensorboard = str(run_dir / "tensorboard") if config["logging"]["tensorboard"] else None
        if latest is not None:
            model = cls.load(latest / "model.zip", env=vec_env, device=algo["device"], tensorboard_log=tensorboard,
                             verbose=config["logging"]["verbose"], **_hyperparams(config))
            if (latest / "replay_buffer.pkl").is_file() and hasattr(model, "load_replay_buffer"):
                model.load_replay_buffer(latest / "replay_buffer.pkl")
            restore_rng(rng, model)
            display.print(f"resuming {algo['name'].upper()} from {latest} at num_timesteps={model.num_timesteps}"
                          + (f" (changed since: {', '.join(changed)})" if changed else ""))
        else:
            model = cls(algo["policy"], vec_env, seed=algo["seed"], device=algo["device"],
                        tensorboard_log=tensorboard, verbose=config["logging"]["verbose"],
                        policy_kwargs=_policy_kwargs(config), **_hyperparams(config))
        if algo["name"] == "ppo":
            rollout = model.n_steps * model.n_envs
            if algo["total_timesteps"] % rollout:
                display.print(f"warning: PPO collects whole rollouts of n_steps*n_envs={rollout} steps: training "
                              f"will run to {math.ceil(algo['total_timesteps'] / rollout) * rollout} steps, not "
                              f"algo.total_timesteps={algo['total_timesteps']}")
        wandb_run = start_wandb(config, run_dir, state.get("wandb_id"))
        if wandb_run is not None:
            state["wandb_id"] = wandb_run.id
        callback = _make_callback_class()(config=config, run_dir=run_dir, eval_env=eval_env, state=state,
                                          progress=display, wandb_run=wandb_run, vec_normalize=vec_normalize,
                                          in_process_envs=not subproc)
        remaining = algo["total_timesteps"] - model.num_timesteps
        started, start_step = time.time(), model.num_timesteps
        if remaining > 0:
            from stable_baselines3.common.callbacks import CallbackList

            model.learn(total_timesteps=remaining, callback=CallbackList([callback, *extra_callbacks]),
                        reset_num_timesteps=latest is None, tb_log_name=algo["name"].upper(), progress_bar=False)
        else:
            display.print(f"already at num_timesteps={model.num_timesteps} >= algo.total_timesteps="
                          f"{algo['total_timesteps']}: nothing to train")
            from stable_baselines3.common.utils import configure_logger

            model.set_logger(configure_logger(config["logging"]["verbose"], tensorboard, algo["name"].upper(), False))
            callback.init_callback(model)
            callback.finish()
        elapsed = time.time() - started
        save_final(model, run_dir, vec_normalize)
        summary = {"run_dir": str(run_dir), "num_timesteps": int(model.num_timesteps),
                   "trained_steps": int(model.num_timesteps - start_step), "seconds": elapsed,
                   "final_model": str(run_dir / FINAL_MODEL),
                   "last_eval": state["eval_history"][-1] if state["eval_history"] else None}
        display.print(f"done: num_timesteps={summary['num_timesteps']} in {elapsed:.1f}s; policy "
                      f"{summary['final_model']}")
        if wandb_run is not None and summary["last_eval"]:
            wandb_run.summary.update({f"final/{k}": summary["last_eval"][k] for k in EVAL_METRICS})
        return summary
    except BaseException:
        if wandb_run is not None:
            wandb_run.finish(exit_code=1)
            wandb_run = None
        raise
    finally:
        display.stop()
        if wandb_run is not None:
            wandb_run.finish()
        vec_env.close()
        if eval_env is not None:
            eval_env.close()


def save_final(model, run_dir: Path, vec_normalize=None) -> None:
    """final_model.zip (+ vecnormalize.pkl) written atomically beside config.yaml."""
    partial = run_dir / f"{TMP_PREFIX}{FINAL_MODEL}.{os.getpid()}.zip"
    model.save(partial)
    os.replace(partial, run_dir / FINAL_MODEL)
    if vec_normalize is not None:
        partial = run_dir / f"{TMP_PREFIX}{VECNORMALIZE}.{os.getpid()}"
        vec_normalize.save(str(partial))
        os.replace(partial, run_dir / VECNORMALIZE)
    _fsync_dir(run_dir)


# ----------------------------------------------------------------------------- --eval
def evaluate_policy_file(policy: str, out: str | None, overrides: list[str]) -> dict:
    """Play one deterministic episode of a saved policy on its exact eval env; write the allocation JSON."""
    try:
        agent = RLPolicyAgent(policy)
    except FileNotFoundError as error:
        raise ConfigError(str(error)) from None
    # The saved config is complete, so it is both the base and the schema of the overrides.
    config = load_config(None, overrides, agent.config)
    config = validate(config)
    if config["algo"]["torch_threads"] is not None:
        import torch

        torch.set_num_threads(config["algo"]["torch_threads"])
    env = _build_env(lambda: make_env(**eval_env_kwargs(config)), "evaluation")
    try:
        result = agent.run(env, seed=config["algo"]["seed"])
    finally:
        env.close()
    record = {"allocation": result["allocation"], "granularity": result["granularity"], "model": result["model"],
              "method": config["env"]["method"], "pattern": config["env"]["pattern"],
              "target_sparsity": result["target_sparsity"], "achieved_sparsity": result["achieved_sparsity"],
              "ppl": result["ppl"], "fact_acc": result["fact_acc"], "fact_nll": result["fact_nll"],
              "fact_retention": result["fact_retention"], "reward": result["reward"],
              "dense": {"ppl": result["dense_ppl"], "fact_acc": result["dense_fact_acc"]},
              "fidelity": result["fidelity"], "units": result["units"], "agent": result["agent"],
              "algo": result["algo"], "policy": result["policy"],
              "data": eval_env_kwargs(config)["data"], "seconds": result["seconds"]}
    out_path = Path(out) if out else agent.path.with_suffix(".allocation.json")
    atomic_write_text(out_path, json.dumps(record, indent=1) + "\n")
    print(f"policy      {agent.path} ({agent.algo.upper()}, trained on {config['env']['fidelity']})")
    print(f"model       {record['model']}  granularity {record['granularity']}  method {record['method']}")
    print(f"sparsity    target {record['target_sparsity']:.4f}  achieved {record['achieved_sparsity']:.4f}")
    print(f"ppl         {record['ppl']:.3f}  (dense {record['dense']['ppl']:.3f})")
    print(f"fact_acc    {record['fact_acc']:.4f}  (dense {record['dense']['fact_acc']:.4f})  "
          f"retention {record['fact_retention']:.4f}")
    print(f"reward      {record['reward']:+.5f}")
    print(f"allocation  {' '.join(f'{r:.3f}' for r in record['allocation'])}")
    print(f"written     {out_path}")
    return record


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python train.py", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="overrides: key=value pairs over the config, e.g. env.target_sparsity=0.6 "
                                            "algo.total_timesteps=20000 env.data.text=corpus.txt")
    parser.add_argument("--config", default=None, help=f"YAML config (default {DEFAULT_CONFIG.relative_to(ROOT)})")
    parser.add_argument("--resume", action="store_true", help="continue from run_dir's latest checkpoint")
    parser.add_argument("--eval", metavar="POLICY", default=None,
                        help="play a saved policy (zip or run folder) on one exact episode and write its allocation")
    parser.add_argument("--out", default=None, help="with --eval: allocation JSON path "
                                                   "(default <policy>.allocation.json)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.eval is not None:
            if args.config is not None or args.resume:
                raise ConfigError("--eval reads the config saved beside the policy: do not combine it with --config "
                                  "or --resume")
            evaluate_policy_file(args.eval, args.out, args.overrides)
            return 0
        if args.out is not None:
            raise ConfigError("--out only applies to --eval")
        config = resolve_config(args.config, args.overrides)
        if args.print_config:
            print(yaml.safe_dump(config, sort_keys=False), end="")
            return 0
        try:
            train(config, resume=args.resume)
        except KeyboardInterrupt:
            latest = latest_checkpoint(Path(config["run_dir"]) / config["checkpoint"]["dir"])
            print(f"train.py: interrupted; last checkpoint: {latest or 'none'} (continue with --resume)",
                  file=sys.stderr)
            return 130
        return 0
    except ConfigError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
