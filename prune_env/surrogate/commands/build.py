"""`make surrogate`: (re)build the surrogate's data set of exactly evaluated allocations, then its fit.

    python scripts/build_surrogate.py [--model smollm2-135m] [--rounds 30] [--out PATH] [--threads 1]
    python scripts/build_surrogate.py --device cuda --shard 3/12 --deadline 300 --out shard3.jsonl  # one of 12
    python scripts/build_surrogate.py --merge shard*.jsonl --out merged.jsonl                      # then join

Each draw is one allocation at one target in {0.3, 0.4, 0.5, 0.6}, played through LayerPrune-v0 with
fidelity="exact" (one step per unit, as `agents.base.play` does) and appended as one JSON line with the
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
non-uniform allocations a learning policy is drawn to, not any one rule). Every allocation is budget-matched with `agents.allocators.match_budget` into the
env's [min_sparsity, max_sparsity]. Only this script imports agents: prune_env never does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.allocators import match_budget, zscore_greedy_ratios  # noqa: E402
from agents.base import play  # noqa: E402
from prune_env.surrogate import PACKAGED, append_record, heldout, read_dataset, start_dataset  # noqa: E402

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
    from agents.allocators import owl_ratios_from_lod
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


def merge(shards: list[Path], out: Path) -> int:
    """Join shard files built with one header (model, data, plan) into one data set ordered by draw."""
    first = read_dataset(shards[0])
    records = {r["draw"]: r for r in first.records}
    for path in shards[1:]:
        other = read_dataset(path)
        for key in ("context", "model_file", "dense", "plan", "reward", "env"):
            if other.header.get(key) != first.header.get(key):
                raise ValueError(f"{str(path)!r} was built with a different {key} than {str(shards[0])!r}: "
                                 f"only shards of one build can be merged")
        records.update({r["draw"]: r for r in other.records})
    header = {k: v for k, v in first.header.items() if k not in ("format", "version")}
    if out.exists():
        raise FileExistsError(f"{str(out)!r} exists: merge into a new file")
    start_dataset(out, header)
    for draw in sorted(records):
        append_record(out, records[draw])
    return len(records)


def git_commit() -> str:
    """HEAD of this checkout; $PRUNE_GYM_GIT_COMMIT names it for a copy without .git (a remote GPU machine)."""
    if os.environ.get("PRUNE_GYM_GIT_COMMIT"):
        return os.environ["PRUNE_GYM_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[1],
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
    from prune_env.context import DataConfig, PruningContext
    from prune_env.rewards import RewardConfig

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
        "git_commit": git_commit(), "machine": machine(device),
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
        info = play(env, ratios, target=draw["target"], seed=seed)
        seconds = time.perf_counter() - start
        record = {**draw, "params": params, "requested": ratios, "allocation": info["allocation"],
                  "ppl": info["ppl"], "fact_acc": info["fact_acc"], "fact_nll": info["fact_nll"],
                  "fact_retention": info["fact_retention"], "achieved_sparsity": info["achieved_sparsity"],
                  "quality": info["quality"], "seconds": seconds, "commit": commit}
        append_record(out, record)
        log(f"[{count}/{len(todo)}] draw {draw['draw']} t={draw['target']} {draw['kind']} {draw['variant']} "
            f"ppl={info['ppl']:.2f} fact_acc={info['fact_acc']:.3f} quality={info['quality']:.4f} {seconds:.1f}s")
    env.close()
    return len(todo)


def summary(out: Path) -> str:
    """Counts per target and kind, seconds per record and the fit's held-out figures (5-fold by draw)."""
    data = read_dataset(out)
    counts: dict = {}
    for record in data.records:
        counts.setdefault(record["target"], {}).setdefault(record["kind"], 0)
        counts[record["target"]][record["kind"]] += 1
    lines = [f"{out}: {len(data.records)} records, "
             f"{np.mean([r['seconds'] for r in data.records]):.1f} s per exact episode"]
    lines += [f"  target {t}: {dict(sorted(c.items()))}" for t, c in sorted(counts.items())]
    if len(data.records) >= 10:
        figures = heldout(data)
        per_target = ", ".join(f"{t}: {v:.3f}" for t, v in figures["spearman_per_target"].items() if v is not None)
        lines.append(f"held-out (5-fold by draw) Spearman of predicted vs exact reward {figures['spearman']:.3f} "
                     f"(per target {per_target}), bias {figures['bias']:+.4f}, MAE {figures['mae']:.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path, default=PACKAGED, help="the data set (appended to, resumable)")
    parser.add_argument("--rounds", type=int, default=30, help="rounds of near/random/structured draws per target")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--data", type=json.loads, default=None, help="DataConfig overrides as JSON")
    parser.add_argument("--no-fit", dest="fit", action="store_false", help="only collect")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (float32 either way)")
    parser.add_argument("--shard", default="0/1", help="I/N: play only the draws whose number is I modulo N")
    parser.add_argument("--deadline", type=float, default=None, help="seconds after which no new draw starts")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, help="shard files to join into --out")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    try:
        if args.merge:
            print(f"{args.out}: {merge(args.merge, args.out)} records merged", flush=True)
        else:
            index, _, count = args.shard.partition("/")
            if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
                raise ValueError(f"--shard {args.shard!r} must be I/N with 0 <= I < N, e.g. 0/4")
            build(args.model, args.out, args.rounds, args.seed, args.data, log=lambda m: print(m, flush=True),
                  device=args.device, shard=(int(index), int(count)), deadline=args.deadline)
    except (ValueError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.fit:
        print(summary(args.out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
