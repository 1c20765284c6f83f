"""`python -m prune_env.surrogate build` (`make surrogate`): the surrogate's data set of exactly evaluated
allocations (`merge` joins shards built on a GPU; `fit` prints the k-fold figures).

    python -m prune_env.surrogate build [--model smollm2-135m] [--rounds 30] [--out PATH] [--threads 1]
    python -m prune_env.surrogate build --device cuda --shard 3/12 --deadline 300 --out shard3.jsonl  # 1 of 12
    python -m prune_env.surrogate merge shard*.jsonl --out merged.jsonl                               # then join

Each draw is one allocation at one target in {0.3, 0.4, 0.5, 0.6}, played through LayerPrune-v0 with
fidelity="exact" (one step per unit, as `agents.base.play_allocation` does) and appended as one JSON line with the
env's final metrics. Draws are numbered and seeded (numpy generator [seed, draw]), so a rerun skips the
draws already in the file and continues where the last run stopped. They are ordered in rounds: round 0
is uniform at every target, each later round is one near-uniform, one random and one structured draw at
every target, so a run stopped at any point leaves a set balanced over targets and kinds. `--shard I/N`
plays only the draws whose number is I modulo N (N processes share one GPU), `--deadline` stops starting new
draws after that many seconds, and `--merge` joins shards that share one header into one data set.

Kinds: near (uniform plus Gaussian noise, i.i.d. or smooth over depth, sd 0.01-0.08: where a learning
policy spends its time), random (Dirichlet weights, concentration 0.3-10), structured (depth ramps up or
down, protected first / last / both ends, the z-score rule at several spreads, OWL and AlphaPruning at
several strengths), smooth (a random low-frequency shape over depth: a cosine series of 1-4 terms with
decaying amplitude, with the first or last blocks protected half of the time; the broad family of smooth
non-uniform allocations a learning policy is drawn to, not any one rule). Every allocation is budget-matched
with `agents.rules.match_budget` into the env's [min_sparsity, max_sparsity]. The draws need agents'
rules, so this is a command module: prune_env's library modules never import agents.

Knowledge: each record carries the pruned model's per-fact flags on the env's facts (greedy-exact and
multiple-choice correct, as hex bitmasks: the facts are scored once more on the pruned model after the
episode, a full forward over the facts) and the balanced retention and accuracy the env reported; the
header's `fact_set` holds every fact's (relation, answer) and the dense flags (`dataset.knowledge_of`).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from agents.rules import match_budget, zscore_greedy_ratios
from agents.base import play_allocation

from ..dataset import append_record, pack_flags, start_dataset

TARGETS = (0.3, 0.4, 0.5, 0.6)
KINDS = ("near", "random", "structured", "smooth")
STRUCTURED = ("ramp_up", "ramp_down", "protect_first", "protect_last", "protect_ends", "zscore", "owl",
              "alphapruning")
LOW, HIGH = 0.0, 0.9  # LayerPrune-v0's default min_sparsity / max_sparsity


def plan(rounds: int, targets=TARGETS) -> list[dict]:
    """Every draw in build order: (draw number, target, kind, structured variant)."""
    draws = [{"target": t, "kind": "uniform", "variant": ""} for t in targets]
    for r in range(rounds):
        for kind in KINDS:
            for j, t in enumerate(targets):
                variant = STRUCTURED[(r + j) % len(STRUCTURED)] if kind == "structured" else ""
                draws.append({"target": t, "kind": kind, "variant": variant})
    return [{"draw": i, **d} for i, d in enumerate(draws)]


class Profile:
    """What the structured rules read from the dense model, computed once before any episode."""

    def __init__(self, ctx):
        from agents.heuristics import block_lod, linear_alphas

        self.numel = [u.numel for u in ctx.units]
        self.z_wanda, self.z_grad = list(ctx.z_wanda), list(ctx.z_grad)
        _, self.lod, _ = block_lod(ctx)
        self.alphas = linear_alphas(ctx)
        unit_of = {ref.name: u for u, unit in enumerate(ctx.units) for ref in unit.linears}
        self.unit_of_layer = [unit_of[ref.name] for ref in ctx.refs]
        self.layer_numel = [ref.numel for ref in ctx.refs]


def allocation(draw: dict, seed: int, profile: Profile) -> tuple[list[float], dict]:
    """The draw's requested per-unit ratios (budget-matched) and the parameters that produced them."""
    from agents.rules import owl_ratios_from_lod
    from agents.alphapruning import alphapruning_ratios

    rng = np.random.default_rng([seed, draw["draw"]])
    t, n = draw["target"], len(profile.numel)
    depth = np.linspace(0.0, 1.0, n)
    kind, variant = draw["kind"], draw["variant"]
    params: dict = {}
    if kind == "uniform":
        raw = np.full(n, t)
    elif kind == "near":
        sd = float(np.exp(rng.uniform(np.log(0.01), np.log(0.08))))
        smooth = bool(rng.random() < 0.5)
        noise = rng.normal(0.0, 1.0, n)
        if smooth:  # a random walk over depth, rescaled: neighbouring blocks move together
            noise = np.cumsum(noise)
            noise = (noise - noise.mean()) / max(noise.std(), 1e-12)
        raw = t + sd * noise
        params = {"sd": sd, "smooth": smooth}
    elif kind == "random":
        concentration = float(np.exp(rng.uniform(np.log(0.3), np.log(10.0))))
        raw = rng.dirichlet(np.full(n, concentration)) * n * t
        params = {"concentration": concentration}
    elif kind == "smooth":
        terms = int(rng.integers(1, 5))
        amplitude = float(rng.uniform(0.02, 0.25))
        coef = rng.normal(0.0, 1.0, terms) / np.arange(1, terms + 1)
        shape = sum(c * np.cos(np.pi * (k + 1) * depth) for k, c in enumerate(coef))
        raw = t + amplitude * shape / max(float(np.abs(shape).max()), 1e-12)
        ends = {"first": int(rng.random() < 0.35), "last": int(rng.random() < 0.15)}
        k, keep = int(rng.integers(1, 3)), float(rng.uniform(0.0, 0.8))
        if ends["first"]:
            raw[:k] = raw[:k] * keep
        if ends["last"]:
            raw[n - k:] = raw[n - k:] * keep
        params = {"terms": terms, "amplitude": amplitude, "coef": coef.tolist(), **ends, "blocks": k,
                  "relative_sparsity": keep}
    elif variant in ("ramp_up", "ramp_down"):
        slope = float(rng.uniform(0.05, 0.35)) * (1 if variant == "ramp_up" else -1)
        raw = t + slope * (2 * depth - 1)
        params = {"slope": slope}
    elif variant.startswith("protect"):
        most = max(1, min(4, (n - 1) // 2))  # 1-4 blocks, never so many that nothing is left unprotected
        k, keep = int(rng.integers(1, most + 1)), float(rng.uniform(0.0, 0.7))
        raw = np.full(n, t)
        if variant in ("protect_first", "protect_ends"):
            raw[:k] = t * keep
        if variant in ("protect_last", "protect_ends"):
            raw[n - k:] = t * keep
        params = {"blocks": k, "relative_sparsity": keep}
    elif variant == "zscore":
        spread = float(rng.uniform(0.03, 0.3)) * (1 if rng.random() < 0.8 else -1)  # some against the profile
        raw = np.asarray(zscore_greedy_ratios(profile.z_wanda, profile.z_grad, profile.numel, t, abs(spread)))
        if spread < 0:
            raw = 2 * t - raw
        params = {"spread": spread}
    elif variant == "owl":
        lam = float(rng.uniform(0.02, 0.2))
        raw = np.asarray(owl_ratios_from_lod(profile.lod, t, lam, profile.numel))
        params = {"lam": lam}
    elif variant == "alphapruning":
        eps = float(rng.uniform(0.1, 0.5))
        raw = np.asarray(alphapruning_ratios(profile.alphas, profile.layer_numel, t, eps,
                                             unit_of_layer=profile.unit_of_layer))
        params = {"eps": eps}
    else:
        raise ValueError(f"unknown draw kind {kind!r}/{variant!r}")
    return match_budget(raw, profile.numel, t, LOW, HIGH), params


def model_file(spec: str) -> dict:
    """Name, size and sha256 of the model's weights file (the GGUF), or the spec for tiny test models."""
    from prune_env.models import resolve_model_spec

    if spec.startswith("tiny-"):
        return {"spec": spec}
    location, gguf = resolve_model_spec(spec)
    path = Path(location) / gguf if gguf else Path(location) / "config.json"
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return {"spec": spec, "name": path.name, "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def machine(device: str) -> str:
    """Where the records were measured (float32 results agree across machines to about 0.3 %, not bit for bit)."""
    import torch

    where = f"{platform.machine()} {platform.node()} {torch.get_num_threads()} thread(s)"
    if device.startswith("cuda"):
        where += f", {torch.cuda.get_device_name(device)}"
    return where


def git_commit() -> str:
    """HEAD of this checkout; $PRUNE_GYM_GIT_COMMIT names it for a copy without .git (a remote GPU machine)."""
    if os.environ.get("PRUNE_GYM_GIT_COMMIT"):
        return os.environ["PRUNE_GYM_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[3],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def build(model: str, out: Path, rounds: int, seed: int, data: dict | None, log=print, device: str = "cpu",
          shard: tuple[int, int] = (0, 1), deadline: float | None = None) -> int:
    """Play every draw of the plan (of this shard) not yet in `out`, until the deadline (seconds from the
    start); returns how many were added."""
    import gymnasium as gym
    import torch
    import transformers

    import prune_env  # noqa: F401  (registers the environments)
    from ...context import DataConfig, PruningContext
    from ...envs.rewards import RewardConfig

    began = time.perf_counter()
    ctx = PruningContext(model, device=device, data=DataConfig.from_dict(data))
    profile = Profile(ctx)  # before any episode: the rules read dense weights
    header = {
        "env": {"id": "prune_env/LayerPrune-v0", "fidelity": "exact", "min_sparsity": LOW, "max_sparsity": HIGH},
        "context": json.loads(json.dumps(ctx.describe())), "data_config": asdict(ctx.data),
        "reward": asdict(RewardConfig()), "dense": ctx.dense.as_dict(), "model_file": model_file(model),
        "unit_numel": profile.numel, "profile": {"z_wanda": profile.z_wanda, "z_grad": profile.z_grad,
                                                 "owl_lod": profile.lod},
        "plan": {"targets": list(TARGETS), "kinds": ["uniform", *KINDS],
                                               "structured": list(STRUCTURED), "seed": seed},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "git_commit": git_commit(), "machine": machine(device), "fact_set": fact_set(ctx),
    }
    existing = start_dataset(out, header)
    done = {record["draw"] for record in existing.records}
    index, shards = shard
    todo = [d for d in plan(rounds) if d["draw"] not in done and d["draw"] % shards == index]
    log(f"{out}: {len(done)} draws already there, {len(todo)} to play")
    if not todo:
        return 0
    env = gym.make("prune_env/LayerPrune-v0", fidelity="exact", context=ctx, min_sparsity=LOW, max_sparsity=HIGH)
    commit = header["git_commit"]
    for count, draw in enumerate(todo, 1):
        if deadline is not None and time.perf_counter() - began > deadline:
            log(f"deadline of {deadline:.0f} s reached after {count - 1} draws; rerun to continue")
            return count - 1
        ratios, params = allocation(draw, seed, profile)
        start = time.perf_counter()
        info = play_allocation(env, ratios, target=draw["target"], seed=seed)
        flags = fact_flags(ctx)  # the model is left pruned at the episode's end
        seconds = time.perf_counter() - start
        record = {**draw, "params": params, "requested": ratios, "allocation": info["allocation"],
                  **{key: info[key] for key in METRICS}, "achieved_sparsity": info["achieved_sparsity"],
                  "quality": info["quality"], **flags, "seconds": seconds, "commit": commit}
        append_record(out, record)
        log(f"[{count}/{len(todo)}] draw {draw['draw']} t={draw['target']} {draw['kind']} {draw['variant']} "
            f"ppl={info['ppl']:.2f} fact_acc={info['fact_acc']:.3f} quality={info['quality']:.4f} {seconds:.1f}s")
    env.close()
    return len(todo)


METRICS = ("ppl", "fact_acc", "fact_nll", "fact_retention", "fact_retention_balanced", "fact_acc_balanced",
           "fact_answer_ppl_balanced")
"""What a record keeps of the env's final info (with the allocation, sparsity, reward and per-fact flags)."""


def fact_flags(ctx) -> dict[str, str]:
    """The model's per-fact greedy-exact and multiple-choice flags on the context's facts, packed."""
    from ...data.evaluation import evaluate_facts

    scores = evaluate_facts(ctx.model, ctx.tokenizer, ctx.facts, ctx.data.fact_batch_size)
    return {"fact_greedy_exact": pack_flags(scores.greedy_exact), "fact_correct": pack_flags(scores.correct)}


def fact_set(ctx) -> dict:
    """Each fact's (relation, answer) and the dense model's flags: what makes records' flags readable. The
    greedy-exact ones are the env's retention reference (its dense metrics), the correct ones scored here."""
    ctx.restore()
    return {"labels": [[fact.relation, fact.answer] for fact in ctx.facts], **fact_flags(ctx),
            "fact_greedy_exact": pack_flags(ctx.dense.greedy_exact)}
