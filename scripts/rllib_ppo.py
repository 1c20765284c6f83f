"""RLlib PPO on LayerPrune-v1 (surrogate fidelity by default), scaled out over RLlib env runners.

    pip install -e ".[rllib]"
    OMP_NUM_THREADS=1 python scripts/rllib_ppo.py --runners 1 2 4 --iterations 4     # steps/s per runner count
    OMP_NUM_THREADS=1 python scripts/rllib_ppo.py --sb3 4 --steps 3000              # SB3 Dummy- vs SubprocVecEnv

Each env runner is a Ray worker process with its own env (its own PruningContext: the model's load and
calibration profile, once per runner); the surrogate step then costs microseconds, so an iteration's
time is RLlib's sampling and learning overhead. Figures (docs/results/rllib/README.md) are env steps
sampled per second of iteration wall time, the first iteration (runner start-up) left out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

ENV_NAME = "prune_env_layerprune_v1"
DEFAULT_ENV = {"fidelity": "surrogate", "action_mode": "budget", "target_sparsity_range": (0.3, 0.6)}


def make_layer_prune(env_config: dict):
    """RLlib's env creator: `make_env` (actions rescaled to [-1, 1]) with the run's env keywords."""
    from prune_env.envs.factory import make_env

    return make_env("prune_env/LayerPrune-v1", torch_threads=1, **dict(env_config))


def build_config(env_config: dict, runners: int, batch: int, seed: int = 0):
    """PPO on RLlib's new API stack: `runners` env runners (0: the driver samples), one local learner."""
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.tune.registry import register_env

    register_env(ENV_NAME, make_layer_prune)
    return (PPOConfig()
            .environment(ENV_NAME, env_config=env_config)
            .env_runners(num_env_runners=runners, num_envs_per_env_runner=1,
                         rollout_fragment_length=math.ceil(batch / max(runners, 1)))
            .training(train_batch_size_per_learner=batch, minibatch_size=min(batch, 128), num_epochs=4, lr=3e-4,
                      gamma=1.0, lambda_=1.0)
            .learners(num_learners=0)
            .debugging(seed=seed))


def run(env_config: dict, runners: int, iterations: int, batch: int, seed: int = 0) -> list[dict]:
    """Train `iterations` PPO iterations; one record per iteration: steps sampled, seconds, losses."""
    import ray

    worker_env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                                       os.environ.get("PYTHONPATH")]))}
    ray.init(num_cpus=runners + 1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": worker_env}, ignore_reinit_error=False)
    try:
        algo = build_config(env_config, runners, batch, seed).build_algo()
        records, before = [], 0
        for index in range(iterations):
            result = algo.train()
            sampled = int(result["env_runners"]["num_env_steps_sampled_lifetime"])
            learner = result["learners"]["default_policy"]
            seconds = float(result["time_this_iter_s"])
            sampling = float(result.get("timers", {}).get("env_runner_sampling_timer", math.nan))
            records.append({"iteration": index + 1, "runners": runners, "env_steps": sampled - before,
                            "seconds": round(seconds, 3), "steps_per_s": round((sampled - before) / seconds, 1),
                            "sampling_s": round(sampling, 3),
                            "policy_loss": float(learner["policy_loss"]), "vf_loss": float(learner["vf_loss"]),
                            "episode_return_mean": float(result["env_runners"].get("episode_return_mean", math.nan))})
            before = sampled
        algo.stop()
        return records
    finally:
        ray.shutdown()


def vec_env_rate(kind: str, n_envs: int, steps: int, env_config: dict) -> float:
    """Env steps per second of SB3's `kind` ("dummy" | "subproc") vec env under random actions (after reset:
    start-up left out). A surrogate step costs microseconds, so the subprocesses' pipe round trip dominates."""
    import time

    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    from prune_env.envs.factory import make_env

    vec = make_vec_env(make_env, n_envs=n_envs, seed=0, vec_env_cls=SubprocVecEnv if kind == "subproc" else DummyVecEnv,
                       env_kwargs={"env_id": "prune_env/LayerPrune-v1", "torch_threads": 1, **env_config})
    try:
        vec.reset()
        rng = np.random.default_rng(0)
        started = time.perf_counter()
        for _ in range(math.ceil(steps / n_envs)):
            vec.step(rng.uniform(-1, 1, (n_envs, 1)).astype(np.float32))
        return n_envs * math.ceil(steps / n_envs) / (time.perf_counter() - started)
    finally:
        vec.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runners", type=int, nargs="+", default=[1, 2, 4], help="env runner counts to measure")
    parser.add_argument("--iterations", type=int, default=4, help="PPO iterations per runner count (>= 2)")
    parser.add_argument("--batch", type=int, default=1200, help="env steps per iteration (40 SmolLM2 episodes)")
    parser.add_argument("--sb3", type=int, default=None, metavar="N",
                        help="instead: SB3 DummyVecEnv vs SubprocVecEnv steps/s with N envs")
    parser.add_argument("--steps", type=int, default=3000, help="env steps per SB3 vec env measurement")
    parser.add_argument("--env", type=json.loads, default={}, help="extra LayerPrune-v1 keywords as JSON")
    args = parser.parse_args(argv)
    if args.iterations < 2 or any(n < 0 for n in args.runners) or args.batch < 1:
        parser.error("need --iterations >= 2 (the first is start-up), --runners >= 0 and --batch >= 1")
    if args.sb3 is not None:
        if args.sb3 < 1 or args.steps < 1:
            parser.error("need --sb3 >= 1 envs and --steps >= 1")
        for kind in ("dummy", "subproc"):
            rate = vec_env_rate(kind, args.sb3, args.steps, {**DEFAULT_ENV, **args.env})
            print(json.dumps({"vec_env": kind, "n_envs": args.sb3, "steps_per_s": round(rate, 1)}), flush=True)
        return 0
    for runners in args.runners:
        records = run({**DEFAULT_ENV, **args.env}, runners, args.iterations, args.batch)
        for record in records:
            print(json.dumps(record), flush=True)
        steady = records[1:]
        rate = sum(r["env_steps"] for r in steady) / sum(r["seconds"] for r in steady)
        print(json.dumps({"runners": runners, "steady_steps_per_s": round(rate, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
