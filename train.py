"""Train a Stable-Baselines3 agent (PPO, SAC or DQN) on LayerPrune-v0, or the LLM agent (algo.name: grpo).

    python train.py                                         # configs/ppo.yaml: PPO on smollm2-135m
    python train.py --config configs/sac.yaml env.target_sparsity=0.6 algo.total_timesteps=20000
    python train.py --config configs/ppo.yaml --resume      # continue from run_dir's latest checkpoint
    python train.py --config configs/smoke.yaml --print-config
    python train.py --eval runs/ppo-0/final_model.zip [--out alloc.json] [eval.data.n_facts=100]
    python train.py --config configs/llm-grpo.yaml [--resume]  # LoRA SFT + GRPO (training/grpo.py)

Training runs on the cheap `proxy` fidelity; every `eval.every_steps` steps a separate `exact` env
plays one deterministic episode of the current policy. Its reward, ppl, fact_acc, fact_retention and
achieved sparsity go to TensorBoard (run_dir/tensorboard), wandb (offline by default: run_dir/wandb,
`wandb sync` later), run_dir/eval.jsonl and the console. The run folder and its checkpoints are
described in training/run.py; one process at a time may write a run folder (a second one is refused).

Exit status: 0 done, 2 bad command line / config key or value / run folder in use / damaged run folder or
data file / more envs than the machine holds (one line on stderr), 130 interrupted.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import yaml
from stable_baselines3.common.callbacks import CallbackList
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.utils import configure_logger, set_random_seed
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecNormalize

from training.grpo import is_grpo_config
from agents.rl import CONFIG_NAME, FINAL_MODEL, load_policy, read_run_config, resolve_policy_path
from training.safe_load import build_model, load_normalizer, read_policy_file
from training.train_config import TrainConfig, resolve_config
from training.run import (EVAL_LOG, EVAL_METRICS, ProgressDisplay, SimulatedFailure, TrainingCallback,
                             check_checkpoint, check_checkpoint_dir, latest_checkpoint, list_checkpoints,
                             load_checkpoint, remove_partial_files, reset_resumed, save_final, start_wandb,
                             truncate_eval_log)
from prune_env.config_files import ConfigError, read_yaml
from prune_env.models import DTYPES, read_header
from prune_env.envs.factory import make_env
from prune_env.files import OutputLockedError, atomic_write_json, atomic_write_text, check_writable_dir, output_lock

ROOT = Path(__file__).resolve().parent
DEFAULT_CONFIG = ROOT / "configs" / "ppo.yaml"
# Keys a resumed run may not change (the policy and its env would no longer match its checkpoints).
FIXED_ON_RESUME = ("env.", "algo.name", "algo.policy", "algo.normalize_obs")

__all__ = ["DEFAULT_CONFIG", "SimulatedFailure", "evaluate_policy_file", "list_checkpoints", "main", "resolve_config",
           "train"]


def _flatten(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        out.update(_flatten(value, f"{prefix}{key}.") if isinstance(value, dict) and value
                   else {f"{prefix}{key}": value})
    return out


def _changed_since(run_dir: Path, config: dict) -> list[str]:
    """Keys that differ from the run's config.yaml; keys that must not change in a resumed run raise."""
    if not (run_dir / CONFIG_NAME).exists():
        return []
    old, new = _flatten(read_yaml(run_dir / CONFIG_NAME, "the run's config")), _flatten(config)
    changed = sorted(k for k in set(old) | set(new) if old.get(k, "<unset>") != new.get(k, "<unset>"))
    fixed = [key for key in changed if key.startswith(FIXED_ON_RESUME)]
    if fixed:
        raise ConfigError(f"--resume: the config differs from the run's {CONFIG_NAME} in {fixed}; these cannot change "
                          "in a resumed run (start a new run_dir instead)")
    return changed


ENVS_PER_CORE = 8
ENV_OVERHEAD_BYTES = 32 * 2**20  # an env beyond its model copy: windows, statistics (2-16 MiB on tiny-llama)
WORKER_BYTES = 512 * 2**20  # a SubprocVecEnv worker: Python, torch, transformers (395 MiB measured) + margin


def available_memory() -> int:
    """Bytes this machine can still give (MemAvailable; physical memory where /proc/meminfo is missing)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_vec_env_size(n_envs: int, subproc: bool, model_bytes: int, cpus: int, available: int) -> None:
    """Refuse a vector env the machine cannot run, before any env is built: more than ENVS_PER_CORE envs per
    core, or more memory than is available (each env owns a copy of the model; a subproc worker also holds
    its own template and a Python with torch)."""
    if n_envs > ENVS_PER_CORE * cpus:
        raise ConfigError(f"algo.n_envs={n_envs} is more than {ENVS_PER_CORE} envs per CPU core ({cpus} cores here: at "
                         f"most {ENVS_PER_CORE * cpus}): lower algo.n_envs")
    per_env = model_bytes + ENV_OVERHEAD_BYTES + (model_bytes + WORKER_BYTES if subproc else 0)
    need = n_envs * per_env + model_bytes  # + the evaluation env's copy
    if need > available:
        raise ConfigError(f"algo.n_envs={n_envs} needs about {need / 2**30:.1f} GiB ({per_env / 2**20:.0f} MiB per env "
                         f"for a {model_bytes / 2**20:.0f} MiB model{' in its own process' if subproc else ''}) but "
                         f"{available / 2**30:.1f} GiB are available: lower algo.n_envs"
                         + (" or use algo.vec_env=dummy" if subproc else ""))


def _check_vec_env(config: TrainConfig, subproc: bool) -> None:
    """check_vec_env_size on this machine, with the model's size from its header (no weights loaded)."""
    check_vec_env_size(config.algo.n_envs, subproc, 0, os.cpu_count() or 1, available_memory())  # cores first
    try:
        header = read_header(config.env.model)
    except (ValueError, OSError) as error:
        raise ConfigError(f"could not build the envs: {error}") from error
    model_bytes = header.n_params * torch.empty((), dtype=DTYPES[config.env.dtype]).element_size()
    check_vec_env_size(config.algo.n_envs, subproc, model_bytes, os.cpu_count() or 1, available_memory())


def train(config: TrainConfig, resume: bool = False, extra_callbacks: tuple = (), trust_pickle: bool = False) -> dict:
    """Train (or resume) as the config says, holding the run folder's lock; returns a summary."""
    run_dir = Path(config.run_dir)
    fresh_folder = not run_dir.exists()
    with output_lock(run_dir, "run folder"):
        try:
            return _train_locked(config, run_dir, resume, extra_callbacks, trust_pickle)
        except ConfigError:
            if fresh_folder and not (run_dir / CONFIG_NAME).exists():
                shutil.rmtree(run_dir, ignore_errors=True)  # refused before any work: leave nothing behind
            raise


def _train_locked(config: TrainConfig, run_dir: Path, resume: bool, extra_callbacks: tuple, trust_pickle: bool) -> dict:
    algo, ckpt_dir, config_dict = config.algo, run_dir / config.checkpoint.dir, asdict(config)
    check_checkpoint_dir(run_dir, ckpt_dir)
    latest = latest_checkpoint(ckpt_dir)
    if not resume and (latest is not None or (run_dir / FINAL_MODEL).exists()):
        raise ConfigError(f"run_dir {str(run_dir)!r} already holds a run: pass --resume to continue it, or set "
                          "run_dir=... for a new one")
    changed = _changed_since(run_dir, config_dict) if resume else []
    if latest is not None:  # the checkpoint's own files are checked before any env loads the model
        state = check_checkpoint(latest, trust_pickle)
        if state["algo"] != algo.name:
            raise ConfigError(f"checkpoint {latest} was made by {state['algo']!r}, the config says {algo.name!r}")
    display = ProgressDisplay(config.logging.progress_bar)
    for path in remove_partial_files(run_dir, ckpt_dir):
        display.print(f"removed unfinished file {path}")
    if resume and latest is None:
        display.print(f"--resume: no checkpoint in {ckpt_dir}, starting from scratch")

    # --- envs and model (before anything is written: a bad model name leaves nothing behind)
    if algo.torch_threads is not None:
        torch.set_num_threads(algo.torch_threads)
    set_random_seed(algo.seed)
    evaluating = config.eval.every_steps > 0 or config.eval.final
    subproc = algo.vec_env == "subproc" and algo.n_envs > 1
    _check_vec_env(config, subproc)
    try:
        # training envs first: a surrogate env builds in a second, so a data set it refuses fails before the
        # exact evaluation env loads the model (construction draws no random number: the order changes nothing)
        vec_env = make_vec_env(make_env, n_envs=algo.n_envs, seed=algo.seed,
                               env_kwargs={**config.env_kwargs(), "torch_threads": algo.torch_threads},
                               vec_env_cls=SubprocVecEnv if subproc else DummyVecEnv)
        eval_env = make_env(**config.env_kwargs(evaluation=True)) if evaluating else None
    except (ValueError, OSError) as error:
        raise ConfigError(f"could not build the envs: {error}") from error
    wandb_run = None
    try:
        vec_normalize = None
        if algo.normalize_obs:
            saved = load_normalizer(latest, trust_pickle) if latest is not None else None
            vec_env = vec_normalize = (saved.wrap(vec_env) if saved is not None
                                       else VecNormalize(vec_env, norm_obs=True, norm_reward=False))
        tensorboard = str(run_dir / "tensorboard") if config.logging.tensorboard else None
        model = build_model(config, vec_env, seed=algo.seed, device=algo.device, tensorboard_log=tensorboard,
                            verbose=config.logging.verbose)
        if latest is not None:
            load_checkpoint(latest, model, state, trust_pickle)
            reset_resumed(model, vec_normalize, state.get("envs"))
            truncate_eval_log(run_dir, state["eval_history"])
            display.print(f"resuming {algo.name.upper()} from {latest} at num_timesteps={model.num_timesteps}"
                          + (f" (changed since: {', '.join(changed)})" if changed else ""))
        else:
            state = {"algo": algo.name, "seed": algo.seed, "last_eval_step": 0, "last_checkpoint_step": 0,
                     "eval_history": [], "wandb_id": None, "started_at": time.time()}
            (run_dir / EVAL_LOG).unlink(missing_ok=True)
        atomic_write_text(run_dir / CONFIG_NAME, yaml.safe_dump(config_dict, sort_keys=False))
        if algo.name == "ppo" and algo.total_timesteps % (model.n_steps * model.n_envs):
            rollout = model.n_steps * model.n_envs
            display.print(f"warning: PPO collects whole rollouts of n_steps*n_envs={rollout} steps: training "
                          f"will run to {math.ceil(algo.total_timesteps / rollout) * rollout} steps, not "
                          f"algo.total_timesteps={algo.total_timesteps}")

        # --- the loop
        wandb_run = start_wandb(config, run_dir, state.get("wandb_id"), config_dict)
        if wandb_run is not None:
            state["wandb_id"] = wandb_run.id
        callback = TrainingCallback(config=config, run_dir=run_dir, eval_env=eval_env, state=state, progress=display,
                                    wandb_run=wandb_run, vec_normalize=vec_normalize, in_process_envs=not subproc)
        started, start_step = time.time(), model.num_timesteps
        if algo.total_timesteps > model.num_timesteps:
            model.learn(total_timesteps=algo.total_timesteps - model.num_timesteps, reset_num_timesteps=latest is None,
                        callback=CallbackList([callback, *extra_callbacks]), tb_log_name=algo.name.upper())
        else:
            display.print(f"already at num_timesteps={model.num_timesteps} >= algo.total_timesteps="
                          f"{algo.total_timesteps}: nothing to train")
            model.set_logger(configure_logger(config.logging.verbose, tensorboard, algo.name.upper(), False))
            callback.init_callback(model)
            callback.finish()

        # --- save final
        save_final(model, run_dir, vec_normalize)
        summary = {"run_dir": str(run_dir), "num_timesteps": int(model.num_timesteps),
                   "trained_steps": int(model.num_timesteps - start_step), "seconds": time.time() - started,
                   "final_model": str(run_dir / FINAL_MODEL),
                   "last_eval": state["eval_history"][-1] if state["eval_history"] else None}
        display.print(f"done: num_timesteps={summary['num_timesteps']} in {summary['seconds']:.1f}s; policy "
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


def evaluate_policy_file(policy: str, out: str | None, overrides: list[str], trust_pickle: bool = False) -> dict:
    """Play one deterministic episode of a saved policy on its exact eval env; write the allocation JSON."""
    policy_path = resolve_policy_path(policy)
    config = read_run_config(policy_path, overrides)
    out_path = Path(out) if out else policy_path.with_suffix(".allocation.json")
    check_writable_dir(out_path.parent, "output folder")
    if config.algo.torch_threads is not None:
        torch.set_num_threads(config.algo.torch_threads)
    env_kwargs = config.env_kwargs(evaluation=True)
    read_policy_file(policy_path)  # a damaged policy or normaliser is refused before the env loads the model
    load_normalizer(policy_path.parent, trust_pickle)
    try:
        env = make_env(**env_kwargs)
    except (ValueError, OSError) as error:
        raise ConfigError(f"could not build the evaluation env: {error}") from error
    try:
        result = load_policy(policy_path, env, trust_pickle=trust_pickle).rollout(env, seed=config.algo.seed)
        context = env.unwrapped.context
    finally:
        env.close()
    record = {"allocation": result["allocation"], "granularity": context.granularity, "model": context.spec,
              "method": config.env.method, "pattern": config.env.pattern,
              "target_sparsity": result["target_sparsity"], "achieved_sparsity": result["achieved_sparsity"],
              "ppl": result["ppl"], "fact_acc": result["fact_acc"], "fact_nll": result["fact_nll"],
              "fact_retention": result["fact_retention"], "reward": result["reward"],
              "dense": {"ppl": result["dense_ppl"], "fact_acc": result["dense_fact_acc"]},
              "fidelity": env_kwargs["fidelity"], "units": [unit.name for unit in context.units],
              "agent": f"rl-{config.algo.name}", "algo": config.algo.name, "policy": str(policy_path),
              "data": env_kwargs["data"], "seconds": result["seconds"]}
    atomic_write_json(out_path, record, indent=1)
    print(f"policy      {policy_path} ({config.algo.name.upper()}, trained on {config.env.fidelity})")
    print(f"model       {record['model']}  granularity {record['granularity']}  method {record['method']}")
    print(f"sparsity    target {record['target_sparsity']:.4f}  achieved {record['achieved_sparsity']:.4f}")
    print(f"ppl         {record['ppl']:.3f}  (dense {record['dense']['ppl']:.3f})")
    print(f"fact_acc    {record['fact_acc']:.4f}  (dense {record['dense']['fact_acc']:.4f})  "
          f"retention {record['fact_retention']:.4f}")
    print(f"reward      {record['reward']:+.5f}")
    print(f"allocation  {' '.join(f'{r:.3f}' for r in record['allocation'])}")
    print(f"written     {out_path}")
    return record


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
    parser.add_argument("--trust-pickle", action="store_true",
                        help="also read pickled files of older runs (vecnormalize.pkl, rng.pt, replay_buffer.pkl); "
                             "unpickling can run code: only for files you made yourself")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        if args.eval is not None:
            if args.config is not None or args.resume:
                raise ConfigError("--eval reads the config saved beside the policy: do not combine it with --config "
                                  "or --resume")
            evaluate_policy_file(args.eval, args.out, args.overrides, args.trust_pickle)
            return 0
        if args.out is not None:
            raise ConfigError("--out only applies to --eval")
        if is_grpo_config(args.config or DEFAULT_CONFIG, args.overrides):  # the LLM agent's LoRA run (issue #27)
            from training.grpo import main as tune_main

            return tune_main(args.config or DEFAULT_CONFIG, args.overrides, args.resume, args.print_config)
        config = resolve_config(args.config or DEFAULT_CONFIG, args.overrides)
        if args.print_config:
            print(yaml.safe_dump(asdict(config), sort_keys=False), end="")
            return 0
        try:
            train(config, resume=args.resume, trust_pickle=args.trust_pickle)
        except KeyboardInterrupt:
            latest = latest_checkpoint(Path(config.run_dir) / config.checkpoint.dir)
            print(f"train.py: interrupted; last checkpoint: {latest or 'none'} (continue with --resume)",
                  file=sys.stderr)
            return 130
        return 0
    except (ValueError, FileNotFoundError, PermissionError, NotADirectoryError, OutputLockedError) as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
