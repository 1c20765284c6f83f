"""The parts of a train.py run around `model.learn`: checkpoint files, logging and the callback.

Run folder (run_dir):

    config.yaml                 resolved config (every key)
    final_model.zip             the trained policy (SB3 zip), vecnormalize.json beside it if used
    eval.jsonl                  one line per exact evaluation
    tensorboard/<ALGO>_1/       SB3 TensorBoard events (train/*, rollout/*, eval/*)
    wandb/                      offline wandb run(s)
    checkpoints/step_<N>/       model.zip (policy + optimizer), replay_buffer.safetensors (SAC/DQN),
                                vecnormalize.json (if used), rng.safetensors (python/numpy/torch/action-space
                                RNG), state.json (counters, eval history, wandb id, each env's episode
                                target and generator state; written last)

Nothing in it is a pickle (training/safe_load.py). A checkpoint is written into a hidden staging folder
and renamed into place only when complete, single files through `atomic_path`; a kill -9 at any
moment leaves the previous checkpoints intact, and `remove_partial_files` (called on --resume)
deletes what a killed run left half-written. Checkpoints are taken at the first rollout boundary after
every `checkpoint.every_steps` steps (the policy has been updated on everything counted in
num_timesteps), evaluations at the first episode boundary after `eval.every_steps` (on the eval env's own model).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import deque
from pathlib import Path

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import KVWriter
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm

from agents.rl import CONFIG_NAME, FINAL_MODEL, rollout_policy
from training.safe_load import (LEGACY_REPLAY_BUFFER, LEGACY_RNG, NORMALIZER_FILE,
                              REPLAY_BUFFER_FILE, RNG_FILE, NormalizerStats, check_safetensors, load_normalizer,
                              load_parameters, load_replay_buffer, read_policy_file, restore_legacy_rng, restore_rng,
                              save_replay_buffer, save_rng, trusted_pickle)
from training.train_config import TrainConfig
from prune_env.files import atomic_path, atomic_write_text, staged_directory, to_jsonable
from prune_env.validation import is_finite_number, is_int

STEP_PREFIX = "step_"
MODEL_FILE, STATE_FILE, EVAL_LOG = "model.zip", "state.json", "eval.jsonl"
EVAL_METRICS = ("reward", "quality", "ppl", "fact_acc", "fact_nll", "fact_retention", "achieved_sparsity")
_RUN_FILES = (CONFIG_NAME, FINAL_MODEL, EVAL_LOG, NORMALIZER_FILE)


class SimulatedFailure(RuntimeError):
    """Raised by tests to interrupt training at a chosen step."""


# ----------------------------------------------------------------------------- checkpoint files
def _fsync_tree(path: Path) -> None:
    for item in path.iterdir():
        if item.is_file():
            with item.open("rb") as handle:
                os.fsync(handle.fileno())


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (a step_N folder only exists once it is complete)."""
    found = []
    for path in ckpt_dir.glob(f"{STEP_PREFIX}*") if ckpt_dir.is_dir() else []:
        step = path.name[len(STEP_PREFIX):]
        if step.isdigit() and (path / STATE_FILE).is_file() and (path / MODEL_FILE).is_file():
            found.append((int(step), path))
    return sorted(found)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(ckpt_dir)
    return checkpoints[-1][1] if checkpoints else None


def remove_partial_files(run_dir: Path, ckpt_dir: Path) -> list[Path]:
    """What a killed run left half-written: staging folders of checkpoints and temp files of atomic writes."""
    partial = [path for path in (ckpt_dir.iterdir() if ckpt_dir.is_dir() else [])
               if path.name.startswith((f".{STEP_PREFIX}", ".tmp-"))]
    partial += [path for path in (run_dir.iterdir() if run_dir.is_dir() else [])
                if path.name.endswith(".tmp") and path.name.startswith(tuple(f"{name}." for name in _RUN_FILES))]
    for path in partial:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return partial


def save_model(model, path: Path) -> None:
    """The SB3 zip written atomically (safe_load reads only its tensors and counters back)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        model.save(handle)
        handle.flush()
        os.fsync(handle.fileno())


def save_checkpoint(ckpt_dir: Path, model, state: dict, vec_normalize=None, keep: int = 3) -> Path:
    """Write checkpoints/step_<N>/ through a staging folder; keep the `keep` most recent."""
    step = int(model.num_timesteps)
    final = ckpt_dir / f"{STEP_PREFIX}{step:010d}"
    with staged_directory(final) as staging:
        model.save(staging / MODEL_FILE)
        files = [MODEL_FILE, RNG_FILE, STATE_FILE]
        if isinstance(model, OffPolicyAlgorithm):
            save_replay_buffer(staging / REPLAY_BUFFER_FILE, model.replay_buffer)
            files.append(REPLAY_BUFFER_FILE)
        if vec_normalize is not None:
            NormalizerStats.of(vec_normalize).save(staging / NORMALIZER_FILE)
            files.append(NORMALIZER_FILE)
        save_rng(staging / RNG_FILE, model)
        record = {**state, "num_timesteps": step, "files": sorted(files), "saved_at": time.time(),
                  "envs": env_states(model.get_env()), "ep_info_buffer": list(model.ep_info_buffer or []),
                  "ep_success_buffer": list(model.ep_success_buffer or [])}
        (staging / STATE_FILE).write_text(json.dumps(to_jsonable(record), indent=1))
        _fsync_tree(staging)
    for _, path in list_checkpoints(ckpt_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def check_checkpoint_dir(run_dir: Path, ckpt_dir: Path) -> None:
    """A folder inside the run folder (no link out of it) holding only complete checkpoints: resuming past a
    damaged step_N folder would silently fall back to an older checkpoint, or to scratch."""
    if ckpt_dir.exists() and not ckpt_dir.is_dir():
        raise ValueError(f"checkpoint folder {str(ckpt_dir)!r} is a file, not a folder: move it away, or set "
                         "checkpoint.dir to another name")
    if not ckpt_dir.resolve().is_relative_to(run_dir.resolve()):
        raise ValueError(f"checkpoint folder {str(ckpt_dir)!r} resolves to {str(ckpt_dir.resolve())!r}, outside the "
                         "run folder: a run writes only into its own folder (remove the link)")
    complete = {path for _, path in list_checkpoints(ckpt_dir)}
    broken = sorted(str(path) for path in (ckpt_dir.glob(f"{STEP_PREFIX}*") if ckpt_dir.is_dir() else [])
                    if path not in complete)
    if broken:
        raise ValueError(f"{broken[0]} is not a complete checkpoint (a step_N folder with {MODEL_FILE} and "
                         f"{STATE_FILE}): remove it to resume from the one before")


def _state_problem(state: dict) -> str | None:
    """What in a checkpoint's state.json is not as save_checkpoint writes it (None: nothing)."""
    for key in ("seed", "last_eval_step", "last_checkpoint_step", "num_timesteps"):
        if key not in state or not is_int(state[key]) or state[key] < 0:
            return f"{key} is missing" if key not in state else f"{key}={json.dumps(state[key])[:60]} is not a count"
    if not isinstance(state.get("algo"), str):
        return f"algo={json.dumps(state.get('algo'))[:60]} is not an algorithm name"
    history = state.get("eval_history")
    if not isinstance(history, list) or not all(isinstance(r, dict) and is_int(r.get("step")) for r in history):
        return "eval_history is not a list of evaluation records"
    episodes, successes = state.get("ep_info_buffer", []), state.get("ep_success_buffer", [])  # older: absent
    if not isinstance(episodes, list) or not all(isinstance(e, dict) for e in episodes):
        return "ep_info_buffer is not a list of episode records"
    if not isinstance(successes, list):
        return "ep_success_buffer is not a list"
    envs = state.get("envs")  # older checkpoints: absent
    if envs is not None and not (isinstance(envs, list) and all(
            isinstance(e, dict) and is_finite_number(e.get("target")) and isinstance(e.get("rng"), dict)
            and e["rng"].get("bit_generator") in BIT_GENERATORS for e in envs)):
        return "envs is not a list of env targets and generator states"
    if state.get("wandb_id") is not None and not isinstance(state["wandb_id"], str):
        return f"wandb_id={json.dumps(state['wandb_id'])[:60]} is not a run id"
    return None


def read_state(checkpoint: Path) -> dict:
    """state.json of a checkpoint, checked, else a one-line ValueError naming it (before any env is built)."""
    path = checkpoint / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        problem = _state_problem(state) if isinstance(state, dict) else f"a {type(state).__name__}, not an object"
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        problem = f"not JSON ({str(error)[:80]})"
    if problem:
        raise ValueError(f"{str(path)!r}: {problem}: remove the checkpoint folder to resume from the one before")
    return state


def check_checkpoint(checkpoint: Path, trust_pickle: bool = False) -> dict:
    """Its state (read_state), policy tensors, safetensors headers and VecNormalize statistics checked, so a
    damaged checkpoint is refused in one line before any env loads the model; returns the state."""
    state = read_state(checkpoint)
    read_policy_file(checkpoint / MODEL_FILE)
    for name in (RNG_FILE, REPLAY_BUFFER_FILE):
        if (checkpoint / name).is_file():
            check_safetensors(checkpoint / name)
    load_normalizer(checkpoint, trust_pickle)
    return state


def load_checkpoint(checkpoint: Path, model, state: dict, trust_pickle: bool = False) -> None:
    """Parameters, counters, replay buffer and RNG states of `checkpoint` into `model` (built from the config)."""
    load_parameters(model, checkpoint / MODEL_FILE)
    if isinstance(model, OffPolicyAlgorithm):
        if (checkpoint / REPLAY_BUFFER_FILE).is_file():
            load_replay_buffer(checkpoint / REPLAY_BUFFER_FILE, model.replay_buffer)
        elif (checkpoint / LEGACY_REPLAY_BUFFER).is_file():
            model.load_replay_buffer(trusted_pickle(checkpoint / LEGACY_REPLAY_BUFFER, trust_pickle))
    # SB3 keeps its episode statistics (rollout/ep_rew_mean) when both buffers exist at learn()
    model.ep_info_buffer = deque(state.get("ep_info_buffer", []), maxlen=model._stats_window_size)
    model.ep_success_buffer = deque(state.get("ep_success_buffer", []), maxlen=model._stats_window_size)
    if (checkpoint / RNG_FILE).is_file():
        restore_rng(checkpoint / RNG_FILE, model)
    elif (checkpoint / LEGACY_RNG).is_file():
        restore_legacy_rng(checkpoint / LEGACY_RNG, model, trust_pickle)
    else:
        raise ValueError(f"checkpoint {str(checkpoint)!r} has no {RNG_FILE}: it cannot resume bit for bit; "
                         "remove it to resume from the one before")


BIT_GENERATORS = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")


def env_states(venv) -> list[dict]:
    """Each training env's episode target and generator state, for state.json (resumed target draws equal)."""
    return [{"target": float(target), "rng": generator.bit_generator.state}
            for target, generator in zip(venv.get_attr("target_sparsity"), venv.get_attr("np_random"))]


def reset_resumed(model, vec_normalize, envs: list[dict] | None) -> None:
    """The first reset of a resumed run (learn() then does not reset): each env continues the checkpoint's
    episode target and generator state (`envs`; None in older checkpoints), and VecNormalize stays frozen: the
    checkpointed run already counted this observation (the auto-reset of its last step); twice made runs differ."""
    venv = model.get_env()
    same = envs is not None and len(envs) == venv.num_envs
    if same:
        venv.unwrapped.set_options([{"target_sparsity": env["target"]} for env in envs])
    if vec_normalize is not None:
        vec_normalize.training = False
    try:
        model._last_obs = venv.reset()
    finally:
        if vec_normalize is not None:
            vec_normalize.training = True
    for index, env in enumerate(envs if same else []):
        generator = np.random.Generator(getattr(np.random, env["rng"]["bit_generator"])())
        generator.bit_generator.state = env["rng"]
        venv.set_attr("np_random", generator, indices=index)
    model._last_episode_starts = np.ones((venv.num_envs,), dtype=bool)
    if vec_normalize is not None:
        model._last_original_obs = vec_normalize.get_original_obs()


def save_final(model, run_dir: Path, vec_normalize=None) -> None:
    """final_model.zip (+ vecnormalize.json) written atomically beside config.yaml."""
    save_model(model, run_dir / FINAL_MODEL)
    if vec_normalize is not None:
        NormalizerStats.of(vec_normalize).save(run_dir / NORMALIZER_FILE)


def truncate_eval_log(run_dir: Path, history: list[dict]) -> None:
    """eval.jsonl as the checkpoint saw it (evaluations made after it are dropped: they will be redone)."""
    atomic_write_text(run_dir / EVAL_LOG, "".join(json.dumps(record) + "\n" for record in history))


# ----------------------------------------------------------------------------- logging / console
class WandbWriter(KVWriter):
    """An SB3 logger output format that forwards numeric values to a wandb run."""

    def __init__(self, run):
        self.run = run

    def write(self, key_values: dict, key_excluded: dict, step: int = 0) -> None:
        data = {}
        for key, value in key_values.items():
            if "wandb" in (key_excluded.get(key) or ()):
                continue
            if isinstance(value, np.generic) or (isinstance(value, np.ndarray) and value.ndim == 0):
                value = value.item()
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                data[key] = value
        if data:
            self.run.log(data, step=int(step))

    def close(self) -> None:
        pass


def start_wandb(config: TrainConfig, run_dir: Path, run_id: str | None, config_dict: dict):
    """A wandb run logging into run_dir (offline by default: `wandb sync` later); None when disabled."""
    mode = config.logging.wandb
    if mode == "disabled":
        return None
    os.environ["WANDB_MODE"] = mode
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ["WANDB_DIR"] = str(run_dir)
    import wandb

    settings = wandb.Settings(console="off", x_disable_stats=True)
    return wandb.init(project=config.logging.project, name=run_dir.name, dir=str(run_dir), config=config_dict,
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
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[metrics]}"), console=self.console)
        self.task = self.progress.add_task("train", total=total, completed=completed, metrics="")
        self.progress.start()

    def update(self, completed: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=completed)

    def show(self, step: int, record: dict) -> None:
        if self.progress is not None:
            self.progress.update(self.task, metrics=f"exact@{step}: R {record['reward']:+.4f} ppl {record['ppl']:.2f} "
                                                    f"fact {record['fact_acc']:.3f}")
        self.print(f"eval @ {step}: {format_metrics(record)}")

    def print(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False, soft_wrap=True)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


# ----------------------------------------------------------------------------- callback
class TrainingCallback(BaseCallback):
    """Periodic exact evaluation, checkpoints, wandb/TensorBoard metrics and the progress bar.

    Its state (counters, eval history, wandb id) is saved in each checkpoint's state.json.
    """

    def __init__(self, *, config: TrainConfig, run_dir: Path, eval_env, state: dict, progress: ProgressDisplay,
                 wandb_run=None, vec_normalize=None, in_process_envs: bool = True):
        super().__init__(verbose=0)
        self.config, self.run_dir, self.eval_env, self.state = config, run_dir, eval_env, state
        self.progress, self.wandb_run, self.vec_normalize = progress, wandb_run, vec_normalize
        self.in_process_envs = in_process_envs
        self.ckpt_dir = run_dir / config.checkpoint.dir

    def _on_training_start(self) -> None:
        if self.wandb_run is not None:
            self.model.logger.output_formats.append(WandbWriter(self.wandb_run))
        self.progress.start(self.config.algo.total_timesteps, self.num_timesteps)
        if self.config.eval.at_start and self.eval_env is not None and not self.state["eval_history"]:
            self.evaluate()  # the untrained policy: where the learning curve starts

    def _on_rollout_start(self) -> None:
        # Rollout boundary: the policy has been trained on every step counted so far.
        every, last = self.config.checkpoint.every_steps, self.state["last_checkpoint_step"]
        if every and self.num_timesteps // every > last // every:
            self.checkpoint()

    def _on_step(self) -> bool:
        self.progress.update(self.num_timesteps)
        every, last = self.config.eval.every_steps, self.state["last_eval_step"]
        due = every and self.num_timesteps // every > last // every
        if self.config.eval.final and self.num_timesteps >= self.config.algo.total_timesteps:
            due = False  # the last update comes after this step: finish() evaluates the final policy
        if due and self.eval_env is not None and self._at_episode_boundary():
            self.evaluate()
        return True

    def _on_training_end(self) -> None:
        self.finish()

    def _at_episode_boundary(self) -> bool:
        dones = self.locals.get("dones")
        return not self.in_process_envs or dones is None or bool(np.all(dones))

    def finish(self) -> None:
        """Final evaluation and checkpoint (idempotent)."""
        self.num_timesteps = int(self.model.num_timesteps)
        if self.eval_env is not None and self.config.eval.final and self.state["last_eval_step"] != self.num_timesteps:
            self.evaluate()
        if self.state["last_checkpoint_step"] != self.num_timesteps or not list_checkpoints(self.ckpt_dir):
            self.checkpoint()
        self.progress.update(self.num_timesteps)
        self.progress.stop()

    def evaluate(self) -> dict:
        step = int(self.num_timesteps)
        normalize = self.vec_normalize.normalize_obs if self.vec_normalize is not None else None
        result = rollout_policy(self.model, self.eval_env, train_fidelity=self.config.env.fidelity,
                                normalize=normalize, seed=self.config.algo.seed)
        record = {"step": step, **result, "time": time.time()}
        self.state["eval_history"].append(record)
        self.state["last_eval_step"] = step
        with (self.run_dir / EVAL_LOG).open("a", encoding="utf-8") as handle:
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
        return save_checkpoint(self.ckpt_dir, self.model, self.state, self.vec_normalize, self.config.checkpoint.keep)
