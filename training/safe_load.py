"""Pickle-free policies and checkpoint files: loading a run folder never runs code from it.

A policy is rebuilt from the run's own config.yaml (algorithm, policy class by its SB3 alias, policy
kwargs, hyperparameters) and the env's spaces; only tensors are read from the SB3 zip (its `.pth`
entries, with `torch.load(weights_only=True)`) plus a short list of plain JSON counters from its
`data` entry (num_timesteps...). The zip's cloudpickled `data` entries (policy_class, spaces,
lr_schedule...) are never decoded. The other files are JSON or safetensors: VecNormalize statistics
(`vecnormalize.json`), RNG states (`rng.safetensors`: torch generator bytes as uint8 tensors, numpy
and python states as JSON metadata) and SAC/DQN replay buffers (`replay_buffer.safetensors`).

Pickled files of older runs (vecnormalize.pkl, rng.pt, replay_buffer.pkl) are read only with an
explicit `trust_pickle=True` (`--trust-pickle`), with a warning; otherwise they are refused.
"""

from __future__ import annotations

import json
import pickle
import random
import warnings
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.train_config import TrainConfig, algo_class
from prune_env.files import atomic_path, atomic_write_json
from prune_env.validation import is_finite_number, is_int, is_number

NORMALIZER_FILE = "vecnormalize.json"
RNG_FILE = "rng.safetensors"
REPLAY_BUFFER_FILE = "replay_buffer.safetensors"
LEGACY_NORMALIZER, LEGACY_RNG, LEGACY_REPLAY_BUFFER = "vecnormalize.pkl", "rng.pt", "replay_buffer.pkl"
# Plain numbers of the SB3 zip's `data` entry that a resumed run needs (the rest comes from the config).
COUNTERS = ("num_timesteps", "_episode_num", "_n_updates", "_n_calls", "_current_progress_remaining",
            "exploration_rate")
BUFFER_ARRAYS = ("observations", "next_observations", "actions", "rewards", "dones", "timeouts")


class UnsafeFileError(ValueError):
    """A pickled file that would run code when loaded, refused without an explicit opt-in."""


def trusted_pickle(path: Path, trust_pickle: bool) -> Path:
    """`path` when the caller opted in to unpickling it (with a warning); else UnsafeFileError."""
    if not trust_pickle:
        raise UnsafeFileError(f"{str(path)!r} is a pickle file from an older train.py and loading it can run code: "
                              "pass --trust-pickle (trust_pickle=True) only if you made it yourself")
    warnings.warn(f"unpickling {str(path)!r} because trust_pickle is set: it can run arbitrary code", stacklevel=2)
    return path


# ----------------------------------------------------------------------------- the policy
def build_model(config: TrainConfig, env, *, seed: int | None, device: str = "cpu", tensorboard_log: str | None = None,
                verbose: int = 0):
    """A fresh SB3 model as the config describes it, acting in `env`'s spaces."""
    algo = config.algo
    return algo_class(algo.name)(algo.policy, env, seed=seed, device=device, tensorboard_log=tensorboard_log,
                                 verbose=verbose, policy_kwargs=algo.sb3_policy_kwargs(), **algo.sb3_hyperparams())


def read_counters(path: Path) -> dict[str, int | float]:
    """The plain counters of an SB3 zip's `data` entry, read as JSON (its pickled entries stay undecoded)."""
    try:
        with zipfile.ZipFile(path) as archive:
            data = json.loads(archive.read("data").decode())
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{str(path)!r} is not a policy saved by SB3 ({error}): give a train.py policy zip") from None
    counters = {key: data[key] for key in COUNTERS if key in data}
    bad = {key: value for key, value in counters.items() if not is_number(value)}
    if bad or not is_int(counters.get("num_timesteps")):
        raise ValueError(f"{str(path)!r} has malformed counters {bad or counters}: it was not written by SB3")
    return counters


def read_policy_file(path: Path, device: str = "cpu") -> tuple[dict, dict, dict]:
    """(counters, state dicts, tensor variables) of an SB3 zip, or a one-line ValueError naming it: only the
    `.pth` entries are read, each with torch.load(weights_only=True), so a damaged or tampered entry is refused
    (callers check a policy with it before an env loads the model)."""
    from stable_baselines3.common.save_util import load_from_zip_file

    import torch

    counters = read_counters(path)
    try:
        _, params, variables = load_from_zip_file(path, load_data=False, device=device)
    except Exception as error:  # torch, pickle and zipfile raise many types for a damaged or tampered entry
        detail = " ".join(str(error).split())[:160]
        raise ValueError(f"{str(path)!r} has a damaged or tampered tensor entry ({type(error).__name__}: {detail}): "
                         "give a policy zip written by train.py") from None
    variables = variables or {}
    if not all(isinstance(d, dict) for d in params.values()) or \
            not all(isinstance(t, torch.Tensor) for t in variables.values()):
        raise ValueError(f"{str(path)!r} has a tensor entry that holds no state dict: give a policy zip written by "
                         "train.py")
    return counters, params, variables


def load_parameters(model, path: Path) -> None:
    """Put the tensors and counters of an SB3 zip into `model` (built from the same config)."""
    from stable_baselines3.common.utils import get_device

    counters, params, variables = read_policy_file(path, model.device)
    state_dicts, variable_names = model._get_torch_save_params()
    if set(params) != set(state_dicts) or set(variables) != set(variable_names):
        raise ValueError(f"{str(path)!r} holds {sorted(params)} + {sorted(variables)}, but the run's config "
                         f"builds {sorted(state_dicts)} + {sorted(variable_names)}: the policy and its config.yaml "
                         "do not belong together")
    try:
        model.set_parameters(params, exact_match=True, device=get_device(model.device))
    except (RuntimeError, ValueError, KeyError) as error:  # shapes or names of the tensors differ
        detail = " ".join(str(error).split())[:160]
        raise ValueError(f"{str(path)!r} does not fit the policy its config.yaml builds ({detail}): the policy and "
                         "its config.yaml do not belong together") from None
    for name in variable_names:
        target = model
        for part in name.split("."):
            target = getattr(target, part)
        target.data = variables[name].data.to(target.device)
    for key, value in counters.items():
        setattr(model, key, value)


# ----------------------------------------------------------------------------- VecNormalize statistics
@dataclass
class NormalizerStats:
    """What VecNormalize needs to normalise as it did in training, as plain JSON."""

    obs_mean: list
    obs_var: list
    obs_count: float
    ret_mean: float
    ret_var: float
    ret_count: float
    clip_obs: float
    clip_reward: float
    gamma: float
    epsilon: float
    norm_obs: bool
    norm_reward: bool

    @classmethod
    def of(cls, vec_normalize) -> "NormalizerStats":
        obs, ret = vec_normalize.obs_rms, vec_normalize.ret_rms
        return cls(obs.mean.tolist(), obs.var.tolist(), float(obs.count), float(ret.mean), float(ret.var),
                   float(ret.count), float(vec_normalize.clip_obs), float(vec_normalize.clip_reward),
                   float(vec_normalize.gamma), float(vec_normalize.epsilon), bool(vec_normalize.norm_obs),
                   bool(vec_normalize.norm_reward))

    @classmethod
    def load(cls, path: Path) -> "NormalizerStats":
        """The statistics in `path`, checked (finite numbers, one mean and variance per observation)."""
        try:
            stats = cls(**json.loads(Path(path).read_text(encoding="utf-8")))
            problem = stats._problem()
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, TypeError) as error:
            problem = " ".join(str(error).split())[:120]
        if problem:
            raise ValueError(f"{str(path)!r} is not VecNormalize statistics written by train.py ({problem})")
        return stats

    def _problem(self) -> str | None:
        numbers = ("obs_count", "ret_mean", "ret_var", "ret_count", "clip_obs", "clip_reward", "gamma", "epsilon")
        bad = [name for name in numbers if not is_finite_number(getattr(self, name))]
        bad += [name for name in ("norm_obs", "norm_reward") if not isinstance(getattr(self, name), bool)]
        for name in ("obs_mean", "obs_var"):
            values = getattr(self, name)
            if not isinstance(values, list) or not values or not all(is_finite_number(v) for v in values):
                bad.append(name)
        if not bad and (len(self.obs_mean) != len(self.obs_var) or min(self.obs_var) < 0 or self.ret_var < 0):
            bad.append("obs_var")
        return f"bad {', '.join(bad)}" if bad else None

    def save(self, path: Path) -> None:
        atomic_write_json(path, asdict(self))

    def wrap(self, venv):
        """A VecNormalize around `venv` carrying these statistics."""
        from stable_baselines3.common.vec_env import VecNormalize

        wrapped = VecNormalize(venv, norm_obs=self.norm_obs, norm_reward=self.norm_reward, clip_obs=self.clip_obs,
                               clip_reward=self.clip_reward, gamma=self.gamma, epsilon=self.epsilon)
        obs_mean, obs_var = np.asarray(self.obs_mean), np.asarray(self.obs_var)
        if obs_mean.shape != wrapped.obs_rms.mean.shape:
            raise ValueError(f"saved observation statistics have shape {obs_mean.shape} but the env observes "
                             f"{wrapped.obs_rms.mean.shape}")
        wrapped.obs_rms.mean, wrapped.obs_rms.var, wrapped.obs_rms.count = obs_mean, obs_var, self.obs_count
        wrapped.ret_rms.mean, wrapped.ret_rms.var, wrapped.ret_rms.count = (np.float64(self.ret_mean),
                                                                            np.float64(self.ret_var), self.ret_count)
        return wrapped

    def normalize_obs(self, obs: np.ndarray) -> np.ndarray:
        """VecNormalize.normalize_obs with frozen statistics (for playing a saved policy)."""
        if not self.norm_obs:
            return obs
        scaled = (obs - np.asarray(self.obs_mean)) / np.sqrt(np.asarray(self.obs_var) + self.epsilon)
        return np.clip(scaled, -self.clip_obs, self.clip_obs).astype(np.float32)


def load_normalizer(folder: Path, trust_pickle: bool = False) -> NormalizerStats | None:
    """The statistics saved in `folder` (None when observation normalisation was off)."""
    if (folder / NORMALIZER_FILE).is_file():
        return NormalizerStats.load(folder / NORMALIZER_FILE)
    if (folder / LEGACY_NORMALIZER).is_file():
        with trusted_pickle(folder / LEGACY_NORMALIZER, trust_pickle).open("rb") as handle:
            return NormalizerStats.of(pickle.load(handle))  # noqa: S301 - explicit opt-in above
    return None


# ----------------------------------------------------------------------------- RNG states
def save_rng(path: Path, model) -> None:
    """python, numpy, torch (CPU and CUDA) and action-space generator states, as safetensors."""
    import torch
    from safetensors.torch import save_file

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"cuda_{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()
    metadata = {"python": json.dumps([version, list(internal), gauss]), "numpy": json.dumps(numpy_state),
                "action_space": json.dumps(model.action_space.np_random.bit_generator.state)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def restore_rng(path: Path, model) -> None:
    """Put back the states `save_rng` wrote (so a resumed run continues bit for bit)."""
    import torch
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        version, internal, gauss = json.loads(metadata["python"])
        numpy_state = json.loads(metadata["numpy"])
        numpy_state["state"]["key"] = np.asarray(numpy_state["state"]["key"], dtype=np.uint32)
        space_state = json.loads(metadata["action_space"])
        random.setstate((version, tuple(internal), gauss))
        np.random.set_state(numpy_state)
        torch.set_rng_state(tensors["torch"].to(torch.uint8))
        model.action_space.np_random.bit_generator.state = space_state
    except (SafetensorError, KeyError, TypeError, ValueError, json.JSONDecodeError) as error:
        raise ValueError(f"{str(path)!r} is not an RNG state written by train.py ({error!r})") from None
    cuda = [tensors[f"cuda_{i}"] for i in range(len(tensors) - 1) if f"cuda_{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def restore_legacy_rng(path: Path, model, trust_pickle: bool) -> None:
    """rng.pt of an older train.py (a pickle: read only with trust_pickle)."""
    import torch

    state: dict[str, Any] = torch.load(trusted_pickle(path, trust_pickle), weights_only=False)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "action_space" in state:
        model.action_space.np_random.bit_generator.state = state["action_space"]


def check_safetensors(path: Path) -> None:
    """A safetensors file whose header parses and whose tensors fit the file, else a one-line ValueError."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            handle.keys()
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{str(path)!r} is damaged ({' '.join(str(error).split())[:120]}): remove the checkpoint "
                         "folder to resume from the one before") from None


# ----------------------------------------------------------------------------- replay buffers
def save_replay_buffer(path: Path, buffer) -> None:
    """An SB3 ReplayBuffer's arrays and position, as safetensors."""
    from safetensors.numpy import save_file

    arrays = {name: getattr(buffer, name) for name in BUFFER_ARRAYS if getattr(buffer, name) is not None}
    with atomic_path(path) as tmp:
        save_file(arrays, str(tmp), metadata={"pos": str(int(buffer.pos)), "full": str(bool(buffer.full))})


def load_replay_buffer(path: Path, buffer) -> None:
    """Fill `buffer` (built by the same config) from `save_replay_buffer`'s file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            arrays = {key: handle.get_tensor(key) for key in handle.keys()}
        pos, full = int(metadata["pos"]), metadata["full"] == "True"
    except (SafetensorError, KeyError, ValueError) as error:
        raise ValueError(f"{str(path)!r} is not a replay buffer written by train.py ({error!r})") from None
    for name in BUFFER_ARRAYS:
        current = getattr(buffer, name)
        if current is None:
            continue
        if name not in arrays or arrays[name].shape != current.shape or arrays[name].dtype != current.dtype:
            raise ValueError(f"{str(path)!r}: {name} does not match the replay buffer of this config")
        setattr(buffer, name, arrays[name].copy())
    if not 0 <= pos < buffer.buffer_size:
        raise ValueError(f"{str(path)!r}: position {pos} is outside the buffer of size {buffer.buffer_size}")
    buffer.pos, buffer.full = pos, full
