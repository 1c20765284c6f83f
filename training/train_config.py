"""The typed config of a train.py run, checked in full before any folder is made or model is loaded.

`resolve_config(path, overrides)` reads defaults <- YAML <- key=value overrides (`load_config`) and builds
a `TrainConfig` (sections `env`, `algo`, `eval`, `checkpoint`, `logging`, plus `run_dir`). Every value
is checked in the dataclasses' `__post_init__`: SB3 hyperparameters by a table of known names and
ranges (names SB3's algorithm does not take are refused), policy kwargs likewise, devices with
`check_device`. The saved config.yaml of a run is `asdict(config)`, and `config_from_dict` reads it back
(the RL agent rebuilds a policy from it, so no code ever comes from a run folder).
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from prune_env.config_files import ConfigError, dataclass_from_dict, load_config
from prune_env.context import GRANULARITIES, DataConfig
from prune_env.envs.layer import ACTION_MODES, ACTION_TYPES, FIDELITIES, LayerPruneEnv
from prune_env.pruning.masking import parse_pattern
from prune_env.pruning.methods import check_method
from prune_env.envs.rewards import RewardConfig, check_preference_range
from prune_env.validation import (DTYPE_NAMES, check_choice, check_device, check_flag, check_number, check_ratio,
                                  check_target)

ALGO_NAMES = ("ppo", "sac", "dqn")
LAYER_ENV_IDS = ("prune_env/LayerPrune-v0", "prune_env/LayerPrune-v1")
WANDB_MODES = ("offline", "online", "disabled")
VEC_ENVS = ("dummy", "subproc")
ACTIVATIONS = {"tanh": "Tanh", "relu": "ReLU", "elu": "ELU", "leaky_relu": "LeakyReLU", "gelu": "GELU",
               "silu": "SiLU"}
# Arguments of the SB3 constructors that train.py sets itself, and those that take Python objects.
RESERVED = {"self", "policy", "env", "seed", "tensorboard_log", "policy_kwargs", "verbose", "device",
            "_init_setup_model", "observation_space", "action_space", "lr_schedule", "use_sde"}
_DATA_MINIMUM_ONE = ("calib_samples", "calib_seq_len", "eval_tokens", "eval_seq_len", "batch_size", "fact_batch_size")


def algo_class(name: str) -> type:
    """The SB3 class for an algo name (ppo | sac | dqn)."""
    from stable_baselines3 import DQN, PPO, SAC

    return {"ppo": PPO, "sac": SAC, "dqn": DQN}[check_choice("name", name, ALGO_NAMES)]


# ----------------------------------------------------------------------------- value checks
def _count(low: int) -> Callable[[str, Any], int]:
    return lambda name, value: check_number(name, value, low=low, integer=True)


def _positive(name: str, value: Any) -> float:
    return check_number(name, value, low=0.0, low_open=True)


def _non_negative(name: str, value: Any) -> float:
    return check_number(name, value, low=0.0)


def _unit(name: str, value: Any) -> float:
    return check_number(name, value, low=0.0, high=1.0)


def _optional(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    return lambda name, value: None if value is None else check(name, value)


def _auto_or(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    """SAC's 'auto' (or 'auto_<initial value>') or a number."""
    def checked(name: str, value: Any) -> Any:
        if isinstance(value, str) and (value == "auto" or value.startswith("auto_")):
            if value != "auto":
                _positive(name, _float_or_none(value[5:]))
            return value
        return check(name, value)
    return checked


def _float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _train_freq(name: str, value: Any) -> int | tuple[int, str]:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[1] not in ("step", "episode"):
            raise ValueError(f"{name}={value!r} is not a frequency: give an integer or [n, 'step' | 'episode']")
        return check_number(name, value[0], low=1, integer=True), value[1]
    return check_number(name, value, low=1, integer=True)


def _gradient_steps(name: str, value: Any) -> int:
    if value == -1 and not isinstance(value, bool):
        return -1  # SB3: as many gradient steps as environment steps in the rollout
    return check_number(name, value, low=1, integer=True)


def _net_arch(name: str, value: Any) -> list[int] | dict[str, list[int]]:
    def layers(key: str, sizes: Any) -> list[int]:
        if not isinstance(sizes, list):
            raise ValueError(f"{key}={sizes!r} is not a list of layer sizes: give e.g. [64, 64]")
        return [check_number(f"{key}[{i}]", size, low=1, integer=True) for i, size in enumerate(sizes)]

    if isinstance(value, dict):
        unknown = sorted(set(value) - {"pi", "vf", "qf"})
        if unknown:
            raise ValueError(f"{name} has unknown part(s) {unknown}: use pi, vf (PPO) or pi, qf (SAC/DQN)")
        return {key: layers(f"{name}.{key}", sizes) for key, sizes in value.items()}
    return layers(name, value)


def _activation(name: str, value: Any) -> type:
    """The torch.nn class of an activation name."""
    import torch.nn as nn

    return getattr(nn, ACTIVATIONS[check_choice(name, value, list(ACTIVATIONS))])


HYPERPARAMS: dict[str, Callable[[str, Any], Any]] = {
    "learning_rate": _positive, "n_steps": _count(1), "batch_size": _count(1), "n_epochs": _count(1),
    "gamma": _unit, "gae_lambda": _unit, "clip_range": _positive, "clip_range_vf": _optional(_positive),
    "normalize_advantage": check_flag, "ent_coef": _auto_or(_non_negative), "vf_coef": _non_negative,
    "max_grad_norm": _positive, "use_sde": check_flag, "sde_sample_freq": _count(-1),
    "target_kl": _optional(_positive), "stats_window_size": _count(1), "buffer_size": _count(1),
    "learning_starts": _count(0), "tau": _unit, "train_freq": _train_freq, "gradient_steps": _gradient_steps,
    "optimize_memory_usage": check_flag, "target_update_interval": _count(1),
    "target_entropy": _auto_or(check_number), "use_sde_at_warmup": check_flag, "exploration_fraction": _unit,
    "exploration_initial_eps": _unit, "exploration_final_eps": _unit,
}
"""SB3 hyperparameter -> check returning the value SB3 gets (the YAML value, list -> tuple for train_freq)."""

POLICY_KWARGS: dict[str, Callable[[str, Any], Any]] = {
    "net_arch": _net_arch, "activation_fn": _activation, "ortho_init": check_flag, "log_std_init": check_number,
    "full_std": check_flag, "use_expln": check_flag, "squash_output": check_flag,
    "share_features_extractor": check_flag, "normalize_images": check_flag, "n_critics": _count(1),
    "clip_mean": _positive,
}
"""Policy keyword -> check returning the value the policy gets (activation names -> torch.nn classes)."""


def _checked(options: dict, table: dict, accepted: list[str], where: str, owner: str) -> dict:
    """Each option checked by `table`; names `owner` does not accept, or that take Python objects, refused."""
    out = {}
    for key, value in options.items():
        if key in RESERVED:
            raise ValueError(f"{where}.{key} is set by train.py, not here (use_sde: in algo.hyperparams)")
        if key not in accepted:
            raise ValueError(f"unknown config key '{where}.{key}' for {owner}: valid keys are "
                             f"{sorted(k for k in accepted if k in table)}")
        if key not in table:
            raise ValueError(f"{where}.{key} takes a Python object and cannot be set from a config")
        out[key] = table[key](f"{where}.{key}", value)
    return out


def _accepted(function: Callable) -> list[str]:
    return [name for name in inspect.signature(function).parameters if name not in RESERVED]


def _check_data(values: dict, where: str) -> None:
    """A (partial) DataConfig mapping: known keys, types, sizes, and local files that exist."""
    try:
        DataConfig.from_dict(values)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    for key, value in values.items():
        name = f"{where}.{key}"
        if key in ("text", "facts"):
            if not value:
                raise ValueError(f"{name}={value!r} is empty: give a source name or a file path")
            looks_like_file = "/" in value or value.endswith((".txt", ".jsonl", ".json"))
            if looks_like_file and not Path(value).expanduser().is_file():
                raise ValueError(f"{name}: file {value!r} does not exist")
        elif key in ("eval_offset", "calib_seed"):
            _optional(_count(0))(name, value)
        else:
            check_number(name, value, low=1 if key in _DATA_MINIMUM_ONE else 0, integer=True)


# LayerPruneEnv keywords a training config does not hold, and why; every other keyword is an EnvConfig field
ENV_KEYWORDS_NOT_IN_CONFIG = {
    "context": "a live model context, lent by Python code",
    "render_mode": "training renders nothing",
    "kind_encoding": "env_id sets it (LayerPrune-v1 registers 'role')",
    "extra_features": "features are registered in the caller's process, which train.py is not",
    "reward_mode": "SB3 trains on one scalar reward",
}


def env_keyword_fields(env_class: type, skip: dict[str, str], config_only: tuple[str, ...] = ("env_id",)):
    """A class decorator (under @dataclass) that makes every keyword of `env_class.__init__` outside `skip`
    a field, with the env's type and default, in the signature's order after the `config_only` fields.

    The class declares a keyword only where the config's type or default differs from the env's. So a new
    env keyword is a config key at once, and one without a default, a declared field that is no keyword
    or a stale `skip` entry fails at import, never silently."""
    def decorate(cls: type) -> type:
        params = {name: p for name, p in inspect.signature(env_class.__init__).parameters.items()
                  if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        declared = dict(cls.__dict__.get("__annotations__", {}))
        strays = sorted((set(declared) - set(params) - set(config_only)) | (set(skip) - set(params)))
        if strays:
            raise TypeError(f"{cls.__name__}: {strays} are not keywords of {env_class.__name__}.__init__: "
                            f"rename or remove them")
        hints = typing.get_type_hints(env_class.__init__)
        annotations = {name: declared[name] for name in config_only}
        for name, param in params.items():
            if name in declared:
                annotations[name] = declared[name]
                continue
            if name in skip:
                continue
            if param.default is param.empty:
                raise TypeError(f"{env_class.__name__}.__init__'s keyword {name!r} has no default, so {cls.__name__} "
                                f"cannot offer it: give it a default or list it in ENV_KEYWORDS_NOT_IN_CONFIG")
            annotations[name] = hints.get(name, Any)
            default = param.default
            setattr(cls, name, field(default_factory=lambda d=default: type(d)(d))
                    if isinstance(default, (list, dict, set)) else default)
        cls.__annotations__ = annotations
        return cls
    return decorate


# ----------------------------------------------------------------------------- sections
@dataclass
@env_keyword_fields(LayerPruneEnv, ENV_KEYWORDS_NOT_IN_CONFIG)
class EnvConfig:
    """The env id and the keyword arguments of the training envs (LayerPrune-v0 by default).

    Every LayerPruneEnv keyword is a field with the env's default (`env_keyword_fields`), except those in
    ENV_KEYWORDS_NOT_IN_CONFIG; the fields below differ from the env. `env_id`: or prune_env/LayerPrune-v1
    (fixed linear-role encoding). `target_sparsity_range` [lo, hi]: each training episode draws its target
    from it (one policy for every target). `action_mode="budget"`: actions relative to the budget left (a = 0
    is uniform at any target). `surrogate`: the data set file of fidelity=surrogate (None: the packaged one);
    `surrogate_pessimism` k: reward = prediction - k * the fit's spread there. `observe_profile=False`: the
    policy sees 0 for z_wanda and z_grad (LayerPruneEnv's docstring). `preference_range` [lo, hi]: each episode
    draws a preference w on knowledge vs perplexity, observed and paid (one policy for every trade-off).
    """

    env_id: str = "prune_env/LayerPrune-v0"
    target_sparsity_range: list[float] | None = None
    fidelity: str = "proxy"
    reward: dict = field(default_factory=lambda: asdict(RewardConfig()))
    data: dict = field(default_factory=lambda: asdict(DataConfig()))

    def __post_init__(self) -> None:
        check_choice("env_id", self.env_id, LAYER_ENV_IDS)
        if self.target_sparsity_range is not None:
            if len(self.target_sparsity_range) != 2:
                raise ValueError(f"target_sparsity_range={self.target_sparsity_range!r} is not [lo, hi]")
            low, high = (check_target(value, "target_sparsity_range") for value in self.target_sparsity_range)
            if not self.min_sparsity <= low <= high <= self.max_sparsity:
                raise ValueError(f"target_sparsity_range={self.target_sparsity_range!r} must satisfy min_sparsity "
                                 f"<= lo <= hi <= max_sparsity = [{self.min_sparsity}, {self.max_sparsity}]")
        check_preference_range(self.preference_range)
        if not self.model:
            raise ValueError("model is empty: give a model alias, folder, .gguf file or hub id")
        check_target(self.target_sparsity, "target_sparsity")
        check_ratio("min_sparsity", self.min_sparsity)
        check_ratio("max_sparsity", self.max_sparsity)
        if not self.min_sparsity <= self.target_sparsity <= self.max_sparsity:
            raise ValueError(f"target_sparsity={self.target_sparsity} is outside [min_sparsity, "
                             f"max_sparsity] = [{self.min_sparsity}, {self.max_sparsity}]")
        check_choice("granularity", self.granularity, GRANULARITIES)
        check_method(self.method)
        check_choice("fidelity", self.fidelity, FIDELITIES)
        check_choice("action_type", self.action_type, ACTION_TYPES)
        check_choice("action_mode", self.action_mode, ACTION_MODES)
        check_choice("dtype", self.dtype, DTYPE_NAMES)
        if self.pattern is not None:
            parse_pattern(self.pattern)
        check_number("n_actions", self.n_actions, low=2, integer=True)
        check_number("proxy_eval_tokens", self.proxy_eval_tokens, low=1, integer=True)
        check_number("proxy_facts", self.proxy_facts, low=1, integer=True)
        check_device(self.device)
        try:
            RewardConfig.from_dict(self.reward)
        except ValueError as error:
            raise ValueError(f"reward: {error}") from None
        _check_data(self.data, "data")


@dataclass
class AlgoConfig:
    """The SB3 algorithm, its policy and hyperparameters (SB3's own names), and how envs are run."""

    name: str = "ppo"
    total_timesteps: int = 24000
    seed: int = 0
    n_envs: int = 1
    vec_env: str = "dummy"
    policy: str = "MlpPolicy"
    policy_kwargs: dict | None = field(default_factory=dict)
    hyperparams: dict | None = field(default_factory=dict)
    normalize_obs: bool = False  # VecNormalize on observations (statistics saved beside every policy)
    device: str = "cpu"  # where the policy network trains
    torch_threads: int | None = None  # None: torch's default; 1 is far faster for tiny models on shared cores

    def __post_init__(self) -> None:
        self.policy_kwargs = self.policy_kwargs or {}
        self.hyperparams = self.hyperparams or {}
        cls = algo_class(self.name)
        check_number("total_timesteps", self.total_timesteps, low=1, integer=True)
        check_number("seed", self.seed, low=0, integer=True)
        check_number("n_envs", self.n_envs, low=1, integer=True)
        check_choice("vec_env", self.vec_env, VEC_ENVS)
        _optional(_count(1))("torch_threads", self.torch_threads)
        check_device(self.device)
        check_choice("policy", self.policy, list(cls.policy_aliases))
        self.sb3_hyperparams()
        self.sb3_policy_kwargs()

    def sb3_hyperparams(self) -> dict:
        """The hyperparameters as SB3's constructor takes them (checked)."""
        cls = algo_class(self.name)
        return _checked(self.hyperparams, HYPERPARAMS, _accepted(cls.__init__), "hyperparams", cls.__name__)

    def sb3_policy_kwargs(self) -> dict:
        """The policy kwargs as the SB3 policy takes them (activation names resolved to torch.nn classes)."""
        policy = algo_class(self.name).policy_aliases[self.policy]
        return _checked(self.policy_kwargs, POLICY_KWARGS, _accepted(policy.__init__), "policy_kwargs",
                        policy.__name__)


@dataclass
class EvalConfig:
    """The periodic deterministic evaluation on a separate (exact) env."""

    every_steps: int = 2400  # 0: only the final evaluation (if final: true)
    fidelity: str = "exact"
    data: dict | None = field(default_factory=dict)  # DataConfig overrides over env.data
    final: bool = True  # evaluate once more at the end of training
    at_start: bool = False  # evaluate the untrained policy too (step 0 of the learning curve)

    def __post_init__(self) -> None:
        self.data = self.data or {}
        check_number("every_steps", self.every_steps, low=0, integer=True)
        check_choice("fidelity", self.fidelity, FIDELITIES)
        _check_data(self.data, "data")


@dataclass
class CheckpointConfig:
    every_steps: int = 2400  # 0: only the final checkpoint
    dir: str = "checkpoints"  # relative to run_dir
    keep: int = 3  # most recent checkpoints kept

    def __post_init__(self) -> None:
        check_number("every_steps", self.every_steps, low=0, integer=True)
        check_number("keep", self.keep, low=1, integer=True)
        if not self.dir:
            raise ValueError("dir is empty: give a folder name relative to run_dir")
        parts = Path(self.dir).parts
        if Path(self.dir).is_absolute() or ".." in parts or not parts:
            raise ValueError(f"dir={self.dir!r} must be a folder inside run_dir (relative, no '..'), such as "
                             "'checkpoints': a run writes only into its own folder, under its lock")


@dataclass
class LoggingConfig:
    wandb: str = "offline"
    project: str = "prune-gym"
    tensorboard: bool = True
    progress_bar: bool = True
    verbose: int = 0  # SB3 verbosity (1 also prints SB3's tables)

    def __post_init__(self) -> None:
        check_choice("wandb", self.wandb, WANDB_MODES)
        check_number("verbose", self.verbose, low=0, integer=True)
        if not self.project:
            raise ValueError("project is empty: give a project name")


@dataclass
class TrainConfig:
    env: EnvConfig = field(default_factory=EnvConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run_dir: str | None = None  # None: runs/<config name>-<seed>

    def __post_init__(self) -> None:
        if self.run_dir is not None and not self.run_dir:
            raise ValueError("run_dir is empty: give a folder path")
        if self.algo.name == "dqn" and self.env.action_type != "discrete":
            raise ValueError("algo.name=dqn needs env.action_type=discrete (DQN acts in a Discrete space)")
        if self.algo.name == "sac" and self.env.action_type != "continuous":
            raise ValueError("algo.name=sac needs env.action_type=continuous (SAC acts in a Box space)")

    def env_kwargs(self, evaluation: bool = False) -> dict:
        """make_env kwargs (env_id + env kwargs) of the training env, or of the evaluation env (eval.fidelity,
        eval.data, the fixed target)."""
        kwargs = asdict(self.env)
        if evaluation:  # the evaluation episode is at env.target_sparsity, never a drawn target
            kwargs["fidelity"] = self.eval.fidelity
            kwargs["data"] = {**kwargs["data"], **self.eval.data}
            kwargs["target_sparsity_range"] = None
        if kwargs["target_sparsity_range"] is not None:
            kwargs["target_sparsity_range"] = tuple(kwargs["target_sparsity_range"])
        return kwargs


DEFAULTS: dict[str, Any] = asdict(TrainConfig())
"""Every valid key with its default (the schema of load_config; an empty dict is a free-form mapping)."""


def config_from_dict(values: dict) -> TrainConfig:
    """A TrainConfig from a complete nested mapping (load_config's output or a run's config.yaml)."""
    pattern = (values.get("env") or {}).get("pattern")
    if pattern is not None and not isinstance(pattern, str):  # YAML 1.1 reads an unquoted 2:4 as 124
        raise ConfigError(f"env.pattern={pattern!r} is not a string: write a pattern such as '2:4' in quotes")
    unknown = sorted(set(values) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}: valid keys are {sorted(DEFAULTS)}")
    sections = {name: dataclass_from_dict(cls, values.get(name), name) for name, cls in _SECTIONS.items()}
    try:
        return TrainConfig(**sections, run_dir=values.get("run_dir"))
    except ValueError as error:
        raise ConfigError(str(error)) from None


_SECTIONS = {"env": EnvConfig, "algo": AlgoConfig, "eval": EvalConfig, "checkpoint": CheckpointConfig,
             "logging": LoggingConfig}


def resolve_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """DEFAULTS <- YAML <- overrides, every value checked, run_dir filled in (runs/<config name>-<seed>), and
    the surrogate data set read and checked when the run uses one (--eval plays without it)."""
    config = config_from_dict(load_config(path, overrides, DEFAULTS))
    if "surrogate" in (config.env.fidelity, config.eval.fidelity):  # its data set checked before any model loads
        from prune_env.surrogate import PACKAGED, read_dataset
        try:
            read_dataset(config.env.surrogate or PACKAGED)
        except (ValueError, OSError) as error:
            raise ConfigError(f"env.surrogate: {error}") from None
    if config.run_dir is None:
        config.run_dir = str(Path("runs") / f"{Path(path).stem}-{config.algo.seed}")
    return config
