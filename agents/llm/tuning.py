"""Teaching the LLM agent to prune in the env (issue #27): its prompts, its reward, its warm-start data.

The trained agent reads exactly the one-shot prompt the LLM agent sends (`allocation_messages` of the
env's dense profile table and a target) and writes the same JSON. Training draws targets in
[0.3, 0.6] (the PPO recipe's range), and scores an answer the way the agent's own answer is used:
`read_answer_allocation` (the agent's parser and repairs), `budget_match`, then one LayerPrune-v1 episode on
the SURROGATE fidelity (microseconds, the same env, reward and pessimism as configs/ppo-surrogate.yaml);
the reward is that episode's return. An answer the parser refuses gets `malformed_penalty`, and a valid
answer's return is floored one unit above it, so a valid answer always beats a malformed one in its group
(returns reach -6 on the SmolLM2 surrogate for an allocation that wrecks five blocks at 0.6).

Warm-start (SFT) data: allocations found by CMA-ES (`agents.search.search_allocation`) on the same
reward, one per target, written as prompt/answer pairs. `python -m agents.llm.tuning sft-data` makes
the committed file (docs/results/llm-trained/).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from agents.base import play_allocation
from agents.llm.candidates import budget_match
from agents.llm.parsing import read_answer_allocation
from agents.llm.prompts import allocation_messages
from prune_env.context import profile_table
from prune_env.config_files import ConfigError
from prune_env.files import atomic_write_text

__all__ = ["PLAIN_CHAT_TEMPLATE", "AllocationReward", "answer_text", "draw_targets", "ensure_chat_template",
           "prompt_rows", "reward_env", "search_records", "sft_rows"]

TARGET_RANGE = (0.3, 0.6)
SFT_RATIONALE = "more sparsity where z_sum is low; sensitive units spared"
PLAIN_CHAT_TEMPLATE = (
    "{%- for m in messages %}{%- if m['role'] == 'assistant' %}{{ 'assistant: ' + m['content'] + eos_token + '\n' }}"
    "{%- else %}{{ m['role'] + ': ' + m['content'] + '\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ 'assistant: ' }}{%- endif %}"
)
"""For tokenizers without a chat template (the tiny test models): the same text LocalChatBackend writes
for them ("role: content" lines, then "assistant: "), so a model is trained on the prompt it is played with;
the answer ends with the EOS token, so generation stops after the JSON."""


def ensure_chat_template(tokenizer) -> None:
    """Give a tokenizer without a chat template the plain one (TRL formats conversations with it)."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def reward_env(env: dict):
    """The LayerPrune env an answer is played on: the given env keywords (EnvConfig's, as in
    configs/ppo-surrogate.yaml) on the surrogate fidelity, with absolute actions so `play` applies each
    ratio as asked (the surrogate's reward reads only the allocation, not how actions encode it)."""
    from prune_env.envs.factory import make_env

    kwargs = dict(env)
    if kwargs.get("fidelity") != "surrogate":
        raise ConfigError(f"env.fidelity={kwargs.get('fidelity')!r}: the GRPO reward plays thousands of episodes, "
                          "set env.fidelity=surrogate")
    kwargs.update(action_mode="absolute", target_sparsity_range=None)
    return make_env(**kwargs, rescale=False)


def draw_targets(n: int, seed: int, low: float = TARGET_RANGE[0], high: float = TARGET_RANGE[1]) -> list[float]:
    """`n` targets drawn uniformly in [low, high], rounded to 0.001 (the prompt shows two decimals of a percent)."""
    rng = np.random.default_rng(seed)
    return [round(float(x), 3) for x in rng.uniform(low, high, n)]


def prompt_rows(ctx, targets: list[float]) -> list[dict]:
    """One GRPO prompt per target: the agent's one-shot messages for the env's dense profile."""
    table = profile_table(ctx)
    return [{"prompt": allocation_messages(table, t), "target": float(t)} for t in targets]


def answer_text(ctx, ratios: list[float], rationale: str = SFT_RATIONALE) -> str:
    """An allocation as the JSON the agent asks for (ALLOCATION_SCHEMA), ratios to three decimals."""
    values = {unit.name: round(float(r), 3) for unit, r in zip(ctx.units, ratios)}
    return json.dumps({"ratios": values, "rationale": rationale}, separators=(", ", ": "))


class AllocationReward:
    """TRL reward function: the surrogate episode return of each completion's allocation.

    Called as `reward(prompts=..., completions=..., target=[...])` (TRL passes the data set's columns);
    completions are chat messages ([{"role": "assistant", "content": ...}]) or plain strings.
    """

    __name__ = "surrogate_return"  # TRL logs each reward function under its __name__

    def __init__(self, env, malformed_penalty: float = -10.0) -> None:
        self.env = env
        self.malformed_penalty = float(malformed_penalty)
        ctx = env.unwrapped.context
        self.table = profile_table(ctx)
        self.numel = [float(unit.numel) for unit in ctx.units]
        self.calls = self.malformed = 0

    def score(self, text: str, target: float) -> tuple[float, dict]:
        """(reward, details) of one answer: its parse error, or the played allocation and its metrics."""
        ratios, _, repairs, error = read_answer_allocation(text, self.table, fill=target)
        if error is not None:
            return self.malformed_penalty, {"error": error}
        matched = budget_match(ratios, self.numel, target)
        info = play_allocation(self.env, matched, target=target)
        quality = float(info["quality"])
        if not math.isfinite(quality):
            return self.malformed_penalty, {"error": f"non-finite return {quality}"}
        return max(quality, self.malformed_penalty + 1.0), {"return": quality, "allocation": info["allocation"],
                                                             "repairs": repairs, "ppl": info["ppl"]}

    def __call__(self, prompts: list | None = None, completions: list | None = None, target: list | None = None,
                 **_: Any) -> list[float]:
        if completions is None or target is None:
            raise ValueError("the reward needs the completions and each prompt's target column")
        rewards = []
        for completion, t in zip(completions, target):
            text = completion[-1]["content"] if isinstance(completion, list) else str(completion)
            reward, details = self.score(text, float(t))
            self.calls += 1
            self.malformed += "error" in details
            rewards.append(reward)
        return rewards


def search_records(env, targets: list[float], episodes: int, seed: int, sigma0: float = 0.1) -> list[dict]:
    """CMA-ES on the reward env per target (`episodes` episodes each, uniform first): the best allocation."""
    from agents.search import SearchConfig, search_allocation

    u = env.unwrapped
    numel = [unit.numel for unit in u.context.units]
    config = SearchConfig(optimizer="cmaes", episodes=episodes, fidelity="surrogate", sigma0=sigma0)
    records = []
    for i, target in enumerate(targets):
        def evaluate(allocation: list[float], target: float = target) -> tuple[float, list[float]]:
            info = play_allocation(env, allocation, target=target)
            return float(info["quality"]), list(info["allocation"])

        result = search_allocation(evaluate, numel, target, u.min_sparsity, u.max_sparsity, config, seed + i)
        records.append({"target": target, "allocation": [round(r, 6) for r in result.allocation],
                        "quality": result.quality, "uniform_quality": result.uniform_quality,
                        "episodes": result.episodes, "seed": seed + i})
    return records


def sft_rows(ctx, records: list[dict]) -> list[dict]:
    """Prompt/completion chat pairs (TRL's conversational prompt-completion format) from search records."""
    table = profile_table(ctx)
    return [{"prompt": allocation_messages(table, r["target"]),
             "completion": [{"role": "assistant", "content": answer_text(ctx, r["allocation"])}]}
            for r in records]


def read_records(path: str | Path) -> list[dict]:
    """The records of an SFT data file (one JSON object per line after the header line)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    if not lines or json.loads(lines[0]).get("format") != "prune-gym-llm-sft":
        raise ConfigError(f"{path}: not an SFT data file of `python -m agents.llm.tuning sft-data` (no header line)")
    records = [json.loads(line) for line in lines[1:] if line.strip()]
    for number, r in enumerate(records, 2):
        if not isinstance(r.get("allocation"), list) or not isinstance(r.get("target"), (int, float)):
            raise ConfigError(f"{path}:{number}: a record needs a target and an allocation list")
    return records


def main(argv: list[str] | None = None) -> int:
    """`sft-data`: search allocations on the surrogate and write the SFT data file."""
    parser = argparse.ArgumentParser(prog="python -m agents.llm.tuning", description=main.__doc__)
    parser.add_argument("command", choices=["sft-data"])
    parser.add_argument("--config", default="configs/llm-grpo.yaml", help="the env section of this config is used")
    parser.add_argument("--out", required=True)
    parser.add_argument("--targets", type=int, default=64)
    parser.add_argument("--episodes", type=int, default=300, help="CMA-ES episodes per target")
    parser.add_argument("--seed", type=int, default=1000, help="targets and searches (training prompts use algo.seed)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)
    from training.grpo import resolve_tuning_config

    try:
        if args.targets < 1 or args.episodes < 1:
            raise ConfigError("--targets and --episodes must be at least 1")
        config = resolve_tuning_config(args.config, args.overrides)
        env = reward_env(asdict(config.env))
    except (ValueError, OSError) as error:
        print(f"python -m agents.llm.tuning: error: {error}", file=sys.stderr)
        return 2
    low, high = config.algo.target_range
    records = search_records(env, draw_targets(args.targets, args.seed, low, high), args.episodes, args.seed)
    header = {"format": "prune-gym-llm-sft", "env": asdict(config.env), "targets": args.targets,
              "episodes": args.episodes, "seed": args.seed, "search": "cmaes sigma0=0.1 (agents/search.py)",
              "command": "python -m agents.llm.tuning sft-data " + " ".join(argv if argv is not None else sys.argv[1:])}
    atomic_write_text(Path(args.out), "\n".join(json.dumps(x) for x in [header, *records]) + "\n")
    gain = np.mean([r["quality"] - r["uniform_quality"] for r in records])
    print(f"wrote {len(records)} records to {args.out}; mean return gain over uniform {gain:+.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
