"""The held-out data every cell is measured on: text and facts the envs never score.

`data:` is the env's DataConfig (the slices LayerPrune-v0 / IterativePrune-v0 compute their rewards
on; RL and iterative-LLM agents play envs built with it). The benchmark evaluates elsewhere:
* text: `heldout.eval_tokens` tokens in windows of `heldout.eval_seq_len` starting at
  `heldout.eval_offset`; `auto` = the first token after the env's evaluation region (computed from the
  same corpus with the env's DataConfig). DataConfig draws calibration windows from [0, eval_offset),
  so the benchmark's calibration windows (same count, length and seed as the env's) come from text the
  benchmark never evaluates on: calibration and evaluation stay disjoint.
* facts: `heldout.facts_offset` `auto` = data.facts_offset + data.n_facts (the first fact after the
  env's reward slice of the same seeded permutation, so data.seed must match the env's), and
  `heldout.n_facts` 0 = all remaining facts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from prune_env.context import DataConfig, select_facts
from prune_env.data.facts import Fact, load_facts
from prune_env.data.corpus import load_text
from prune_env.data.windows import split_corpus, tokenize_corpus

from .bench_config import BenchmarkConfig


@dataclass
class HeldoutData:
    """The benchmark context's DataConfig and where the env's reward slices lie."""

    data: DataConfig
    reward_slices: dict  # {"text_region": [start, end], "facts": [start, end]}


def heldout_facts_offset(config: BenchmarkConfig) -> int:
    """Where the held-out facts start in the seeded permutation (`auto`: right after the env's reward facts)."""
    env, held = config.data, config.heldout
    if held.facts_offset != "auto":
        return int(held.facts_offset)
    if env.n_facts == 0:
        raise ValueError("data.n_facts=0 (the env scores all facts), so no fact is held out: set "
                         "heldout.facts_offset (and accept the overlap) or give data.n_facts")
    return env.facts_offset + env.n_facts


def heldout_facts(config: BenchmarkConfig) -> list[Fact]:
    """The held-out facts themselves, without the model (the same selection as the benchmark's context)."""
    env = config.data
    return select_facts(load_facts(env.facts, seed=env.seed), config.heldout.n_facts, heldout_facts_offset(config),
                        env.seed)


def heldout_data(config: BenchmarkConfig, tokenizer, ids: torch.Tensor | None = None) -> HeldoutData:
    """The held-out DataConfig of `config` (tokenising data.text unless its token ids are given)."""
    env, held = config.data, config.heldout
    if ids is None:
        ids = tokenize_corpus(load_text(env.text), tokenizer)
    env_slices = split_corpus(ids, calib_samples=env.calib_samples, calib_seq_len=env.calib_seq_len,
                              eval_tokens=env.eval_tokens, eval_seq_len=env.eval_seq_len, seed=env.calibration_seed,
                              eval_offset=env.eval_offset, source=env.text)
    env_end = env_slices.eval_end
    offset = env_end if held.eval_offset == "auto" else int(held.eval_offset)
    needed = offset + (held.eval_tokens // held.eval_seq_len) * held.eval_seq_len
    if needed > ids.numel():
        raise ValueError(f"the corpus {env.text!r} has {ids.numel()} tokens but the held-out evaluation needs "
                         f"[{offset}, {needed}) (after the env's reward region ending at {env_end}): lower "
                         f"heldout.eval_tokens or use a longer text")
    bench = replace(env, eval_tokens=held.eval_tokens, eval_seq_len=held.eval_seq_len, eval_offset=offset,
                    n_facts=held.n_facts, facts_offset=heldout_facts_offset(config))
    reward_slices = {"text_region": [env_slices.eval_offset, env_end],
                     "facts": [env.facts_offset, env.facts_offset + env.n_facts]}
    return HeldoutData(bench, reward_slices)
