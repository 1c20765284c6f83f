"""Shape and loading proof that a policy moves between models (not a quality result).

Trains a PPO policy briefly on the source model (SmolLM2-135M) in each model-independent id (LayerPrune-v1,
block granularity, proxy fidelity; IterativePrune-v1), saves it with SB3's `model.save`, loads each zip with
`PPO.load(path, env=...)` (SB3 refuses a zip whose saved spaces differ from the env's) into envs on other
models (Gemma-3-270M, a tiny model of another depth) and plays one deterministic episode on each. Writes
results.json and README.md (shapes, episode lengths, achieved sparsity, final perplexity, seconds, machine)
plus the two policy zips to the output folder.

    nice -n 5 .venv/bin/python scripts/transfer_check.py                      # the committed run (needs `make gemma`)
    .venv/bin/python scripts/transfer_check.py --source tiny-llama --targets tiny-llama-5 tiny-gpt2 \\
        --out /tmp/transfer-dry --layer-steps 64 --iterative-steps 16         # a dry run in about a minute

IterativePrune pays the change in quality and nothing for missing the target, and on a real model every
accepted step lowers the quality: nothing in its reward asks a policy trained a few dozen steps to reach the
target. So that the played episodes can run to the target, the IterativePrune reward here adds
`--sparsity-bonus` x achieved sparsity (a registered reward term) and never reverts a step
(rollback_threshold=inf, increment 0.1, at most `--iterative-max-steps` steps). The numbers measure nothing
about pruning quality.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from stable_baselines3 import PPO

from prune_env.envs.factory import make_env
from prune_env.files import atomic_write_json, atomic_write_text, check_writable_dir, output_lock
from prune_env.models import decoder_blocks
from prune_env.envs.plugins import register_reward_term

TARGET = 0.5
DATA = {"calib_samples": 4, "calib_seq_len": 64, "eval_tokens": 512, "eval_seq_len": 256, "n_facts": 16,
        "grad_samples": 2}
SPARSITY_TERM = "sparsity_bonus"
LAYER = ("prune_env/LayerPrune-v1", {"granularity": "block", "fidelity": "proxy", "proxy_eval_tokens": 512,
                                     "proxy_facts": 16})
ITERATIVE_ID = "prune_env/IterativePrune-v1"


def iterative_kwargs(bonus: float, max_steps: int) -> dict:
    return {"granularity": "block", "increment": 0.1, "max_steps": max_steps, "rollback_threshold": math.inf,
            "reward": {"terms": {SPARSITY_TERM: bonus}} if bonus else None}


def describe_env(env) -> dict:
    unwrapped = env.unwrapped
    return {"model": unwrapped.context.spec, "blocks": len(decoder_blocks(unwrapped.context.model)),
            "units": len(unwrapped.units), "observation_shape": list(env.observation_space.shape),
            "action_space": str(env.action_space), "dense_ppl": float(unwrapped.reference.ppl)}


def train(env_id: str, kwargs: dict, source: str, steps: int, rollout: int, path: Path, seed: int) -> dict:
    """PPO on the source model for `steps` env steps, saved with model.save at `path`."""
    started = time.time()
    env = make_env(env_id, model=source, data=DATA, target_sparsity=TARGET, **kwargs)
    built = time.time()
    model = PPO("MlpPolicy", env, n_steps=rollout, batch_size=rollout, n_epochs=4, learning_rate=1e-3, seed=seed,
                device="cpu")
    model.learn(total_timesteps=steps)
    model.save(path)
    record = {"env_id": env_id, **describe_env(env), "timesteps": int(model.num_timesteps),
              "env_build_seconds": built - started, "train_seconds": time.time() - built,
              "policy": path.name, "policy_bytes": path.stat().st_size}
    env.close()
    return record


def play_saved_policy(env_id: str, kwargs: dict, target: str, path: Path) -> dict:
    """Load the saved policy into an env on `target` and play one deterministic episode."""
    started = time.time()
    env = make_env(env_id, model=target, data=DATA, target_sparsity=TARGET, **kwargs)
    built = time.time()
    policy = PPO.load(path, env=env, device="cpu")  # raises ValueError if the saved spaces differ from env's
    if policy.observation_space != env.observation_space or policy.action_space != env.action_space:
        raise AssertionError(f"{path.name}: policy spaces {policy.observation_space} {policy.action_space} "
                             f"!= env spaces {env.observation_space} {env.action_space}")
    obs, _ = env.reset(seed=0)
    steps, total, done, terminated, info = 0, 0.0, False, False, {}
    while not done:
        action, _ = policy.predict(obs, deterministic=True)
        obs, reward, terminated, truncated, info = env.step(action)
        steps, total, done = steps + 1, total + float(reward), terminated or truncated
    record = {"env_id": env_id, **describe_env(env), "policy_observation_shape": list(policy.observation_space.shape),
              "spaces_equal": True, "episode_steps": steps, "terminated": bool(terminated),
              "achieved_sparsity": float(info["achieved_sparsity"]), "target_sparsity": TARGET,
              "final_ppl": float(info["ppl"]), "final_fact_acc": float(info["fact_acc"]), "return": total,
              "env_build_seconds": built - started, "episode_seconds": time.time() - built}
    env.close()
    return record


def machine() -> dict:
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "nice": os.nice(0),
            "load_average_at_start": list(os.getloadavg())}


def markdown(result: dict) -> str:
    lines = ["# Transfer check: one policy, other models",
             "",
             "A **shape and loading proof, not a quality result**: PPO policies trained for a few hundred "
             "(LayerPrune) or a few dozen (IterativePrune) steps on the source model, saved with SB3's "
             "`model.save`, loaded with `PPO.load(path, env=...)` (SB3 refuses a zip whose spaces differ from the "
             "env's) and played for one deterministic episode on models of another depth and family. The "
             "perplexities say nothing about how well these policies prune.",
             "",
             f"- command: `{result['command']}`",
             f"- data: `{result['data']}`, target sparsity {TARGET}",
             f"- IterativePrune: reward quality + {result['sparsity_bonus']} x achieved sparsity, no rollbacks, "
             "increment 0.1 (IterativePrune's own reward pays nothing for reaching the target, so a briefly trained "
             "policy has no reason to get there); env kwargs of each case in results.json",
             f"- machine: {result['machine']['platform']}, {result['machine']['cpus']} CPUs shared with other jobs "
             f"(load {result['machine']['load_average_at_start'][0]:.1f} at start), torch "
             f"{result['machine']['torch']}, torch threads {result['machine']['torch_threads']}, nice "
             f"{result['machine']['nice']}",
             f"- total: {result['seconds']:.0f} s",
             "",
             "## Training on the source model",
             "",
             "| env id | model | blocks | units | observation | action | steps | train s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["trained"].values():
        lines.append(f"| {row['env_id']} | {row['model']} | {row['blocks']} | {row['units']} | "
                     f"{tuple(row['observation_shape'])} | {row['action_space']} | {row['timesteps']} | "
                     f"{row['train_seconds']:.0f} |")
    lines += ["", "## The saved policies on other models", "",
              "| env id | model | blocks | units | policy obs | env obs | episode steps | ended | achieved | "
              "dense ppl | final ppl | s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["played"]:
        ended = "terminated" if row["terminated"] else "truncated"
        lines.append(f"| {row['env_id']} | {row['model']} | {row['blocks']} | {row['units']} | "
                     f"{tuple(row['policy_observation_shape'])} | {tuple(row['observation_shape'])} | "
                     f"{row['episode_steps']} | {ended} | {row['achieved_sparsity']:.4f} | {row['dense_ppl']:.1f} | "
                     f"{row['final_ppl']:.1f} | {row['env_build_seconds'] + row['episode_seconds']:.0f} |")
    lines += ["", "Tiny models are random (their perplexities are meaningless); `s` includes building the env "
              "(model load, calibration statistics, dense metrics). A truncated IterativePrune episode ran its "
              "step cap without a shape error; its deterministic policy did not raise enough bins to reach the "
              "target within the cap (the shapes, not the policy, are what this checks).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="smollm2-135m")
    parser.add_argument("--targets", nargs="+", default=["gemma3-270m", "tiny-llama-5"])
    parser.add_argument("--layer-steps", type=int, default=240, help="LayerPrune-v1 training steps")
    parser.add_argument("--iterative-steps", type=int, default=64, help="IterativePrune-v1 training steps")
    parser.add_argument("--iterative-max-steps", type=int, default=24, help="IterativePrune-v1 episode cap")
    parser.add_argument("--sparsity-bonus", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/results/transfer-check")
    args = parser.parse_args(argv)
    for name in ("layer_steps", "iterative_steps", "iterative_max_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be at least 1")
    torch.set_num_threads(1)
    register_reward_term(SPARSITY_TERM, lambda metrics, dense, context: metrics["achieved_sparsity"])
    out = check_writable_dir(args.out)
    started = time.time()
    iterative = (ITERATIVE_ID, iterative_kwargs(args.sparsity_bonus, args.iterative_max_steps))
    cases = {"layer-v1-block": (*LAYER, args.layer_steps, 30), "iterative-v1": (*iterative, args.iterative_steps, 16)}
    result = {"command": " ".join(["scripts/transfer_check.py", *(argv if argv is not None else sys.argv[1:])]),
              "source": args.source, "targets": args.targets, "data": DATA, "sparsity_bonus": args.sparsity_bonus,
              "seed": args.seed, "machine": machine(), "trained": {}, "played": []}
    with output_lock(out, "transfer-check output folder"):
        (out / "policies").mkdir(exist_ok=True)
        for case, (env_id, kwargs, steps, rollout) in cases.items():
            path = out / "policies" / f"{case}.zip"
            result["trained"][case] = {**train(env_id, kwargs, args.source, steps, rollout, path, args.seed),
                                       "env_kwargs": {k: repr(v) if v == math.inf else v for k, v in kwargs.items()}}
            print(f"trained {case}: {result['trained'][case]}", flush=True)
            for target in args.targets:
                result["played"].append(play_saved_policy(env_id, kwargs, target, path))
                print(f"played {case} on {target}: {result['played'][-1]}", flush=True)
        result["seconds"] = time.time() - started
        atomic_write_json(out / "results.json", result)
        atomic_write_text(out / "README.md", markdown(result))
    failed = [row for row in result["played"] if not math.isfinite(row["final_ppl"])]
    print(f"wrote {out / 'results.json'} and README.md in {result['seconds']:.0f} s"
          + (f"; {len(failed)} episodes ended with a non-finite ppl" if failed else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
