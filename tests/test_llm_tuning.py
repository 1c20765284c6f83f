"""The LLM agent trained in the env (issue #27) on tiny-llama: the GRPO reward on a synthetic surrogate, a few
SFT and GRPO steps through train.py with checkpoints and --resume, and the adapter played by `llm-trained`."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("trl")
pytest.importorskip("peft")

from agents.base import build_agent  # noqa: E402
from agents.llm.tuning import (AllocationReward, answer_text, draw_targets, prompt_rows, reward_env,  # noqa: E402
                               search_records)
from prune_env.config_files import ConfigError  # noqa: E402
from prune_env.surrogate import append_record, start_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def synthetic_surrogate(path: Path, tiny_data: dict, records: int = 40) -> None:
    """A surrogate data set for tiny-llama whose truth is known: block 0 is fragile (perplexity grows fast with
    its sparsity), blocks 1 and 2 are robust; facts follow perplexity."""
    from prune_env.envs.layer import LayerPruneEnv

    exact = LayerPruneEnv(model="tiny-llama", data=tiny_data)
    ctx = exact.context
    start_dataset(path, {"context": ctx.describe(), "dense": ctx.dense.as_dict(), "data_config": asdict(ctx.data),
                         "unit_numel": [u.numel for u in exact.units],
                         "profile": {"z_wanda": list(ctx.z_wanda), "z_grad": list(ctx.z_grad)}})
    rng = np.random.default_rng(0)
    dense = ctx.dense
    for _ in range(records):
        alloc = rng.uniform(0.0, 0.9, len(exact.units))
        damage = 4.0 * alloc[0] ** 2 + 0.3 * (alloc[1] ** 2 + alloc[2] ** 2)
        append_record(path, {"allocation": [float(a) for a in alloc], "ppl": float(dense.ppl * np.exp(damage)),
                             "fact_acc": float(dense.fact_acc * np.exp(-damage / 4)),
                             "fact_nll": float(dense.fact_nll + damage), "fact_retention": float(np.exp(-damage / 4))})
    exact.close()


@pytest.fixture(scope="module")
def synthetic(tiny_data, tmp_path_factory) -> dict:
    """Env keywords of the reward env on the synthetic surrogate."""
    path = tmp_path_factory.mktemp("synthetic") / "tiny-synthetic.jsonl"
    synthetic_surrogate(path, tiny_data)
    return {"env_id": "prune_env/LayerPrune-v1", "model": "tiny-llama", "data": tiny_data, "fidelity": "surrogate",
            "surrogate": str(path), "surrogate_pessimism": 0.0, "max_sparsity": 0.9}


def test_reward_penalises_malformed_answers_and_ranks_allocations(synthetic):
    env = reward_env(synthetic)
    ctx = env.unwrapped.context
    reward = AllocationReward(env, malformed_penalty=-10.0)
    spare_fragile = answer_text(ctx, [0.0, 0.75, 0.75])
    hit_fragile = answer_text(ctx, [0.75, 0.75, 0.0])
    garbage = [[{"role": "assistant", "content": text}] for text in ("no json here", '{"ratios": {"block.0": 0.5}}')]
    good, bad, *malformed = reward(completions=[[{"role": "assistant", "content": spare_fragile}],
                                                [{"role": "assistant", "content": hit_fragile}], *garbage],
                                   target=[0.5] * 4)
    assert malformed == [-10.0, -10.0] and reward.malformed == 2
    assert good > bad > -10.0
    _, details = reward.score(hit_fragile, 0.5)  # the played allocation is the answer's, budget-matched
    assert details["allocation"] == pytest.approx([0.75, 0.75, 0.0], abs=0.01)  # tiny-llama's blocks are equal
    assert ctx.weighted_sparsity(details["allocation"]) == pytest.approx(0.5, abs=1e-3)


def test_a_config_that_is_not_surrogate_is_refused(synthetic):
    with pytest.raises(ConfigError, match="fidelity=surrogate"):
        reward_env({**synthetic, "fidelity": "proxy"})


def test_prompts_are_the_agents_oneshot_prompt(synthetic):
    from agents.llm.prompts import allocation_messages
    from prune_env.context import profile_table

    env = reward_env(synthetic)
    ctx = env.unwrapped.context
    targets = draw_targets(5, seed=3)
    assert targets == draw_targets(5, seed=3) and all(0.3 <= t <= 0.6 for t in targets)
    rows = prompt_rows(ctx, targets)
    assert rows[2]["prompt"] == allocation_messages(profile_table(ctx), targets[2]) and rows[2]["target"] == targets[2]


@pytest.fixture(scope="module")
def grpo_config(synthetic, tmp_path_factory) -> tuple[Path, list[str]]:
    """A tiny train.py config (SFT on searched allocations, then GRPO) and its overrides' run folder."""
    import yaml

    folder = tmp_path_factory.mktemp("run")
    env = reward_env(synthetic)
    records = search_records(env, [0.4, 0.5], episodes=8, seed=0)
    header = {"format": "prune-gym-llm-sft"}
    (folder / "sft.jsonl").write_text("\n".join(json.dumps(x) for x in [header, *records]) + "\n")
    config = {"env": {k: v for k, v in synthetic.items()},
              "algo": {"name": "grpo", "model": "tiny-llama", "seed": 0, "torch_threads": 1,
                       "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                       "sft": {"data": str(folder / "sft.jsonl"), "max_steps": 2, "batch_size": 2},
                       "grpo": {"max_steps": 2, "num_generations": 2, "max_completion_length": 8, "n_prompts": 4}},
              "checkpoint": {"every_steps": 1, "keep": 2},
              "logging": {"wandb": "disabled", "tensorboard": False, "progress_bar": False}}
    path = folder / "tiny-grpo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, [f"run_dir={folder / 'out'}"]


def test_train_py_runs_sft_then_grpo_resumes_and_writes_a_safetensors_adapter(grpo_config, capsys):
    import train

    path, overrides = grpo_config
    run_dir = Path(overrides[0].partition("=")[2])
    assert train.main(["--config", str(path), *overrides, "algo.grpo.max_steps=1"]) == 0
    sft_ckpts = sorted(p.name for p in (run_dir / "sft").glob("checkpoint-*"))
    assert sft_ckpts == ["checkpoint-1", "checkpoint-2"]
    assert (run_dir / "sft" / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "grpo" / "checkpoint-1" / "adapter_model.safetensors").is_file()
    assert (run_dir / "adapter" / "tuning.json").is_file()
    # a second run without --resume is refused; a resumed one with more GRPO steps continues from step 1
    assert train.main(["--config", str(path), *overrides]) == 2
    assert "--resume" in capsys.readouterr().err
    import shutil

    shutil.rmtree(run_dir / "adapter")  # as if the first run had been killed before its end ...
    cut = run_dir / "grpo" / "checkpoint-7"  # ... while saving a later checkpoint: its state file is cut short
    shutil.copytree(run_dir / "grpo" / "checkpoint-1", cut)
    (cut / "trainer_state.json").write_text('{"global_step": 7, "log_hi')
    assert train.main(["--config", str(path), "--resume", *overrides]) == 0
    out = capsys.readouterr().out
    assert f"removed unfinished checkpoint {cut}" in out and not cut.exists()
    assert f"resuming grpo from {run_dir / 'grpo' / 'checkpoint-1'}" in out and "resuming sft" not in out
    state = json.loads((run_dir / "grpo" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert not list((run_dir / "adapter").glob("*.bin")) and (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_resume_may_not_change_the_env(grpo_config, capsys):
    import train

    path, overrides = grpo_config
    if not (Path(overrides[0].partition("=")[2]) / "config.yaml").exists():
        pytest.skip("needs the run of the previous test")
    assert train.main(["--config", str(path), "--resume", *overrides, "env.surrogate_pessimism=1.0"]) == 2
    assert "env.surrogate_pessimism" in capsys.readouterr().err


def test_trained_agent_loads_the_adapter_without_pickle_and_allocates(grpo_config, tiny_data, tmp_path, monkeypatch):
    import torch

    from prune_env.context import PruningContext

    adapter = Path(grpo_config[1][0].partition("=")[2]) / "adapter"
    if not (adapter / "tuning.json").exists():
        pytest.skip("needs the run of the train test")

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load (pickle) called while loading the adapter")

    ctx = PruningContext("tiny-llama", data=tiny_data)  # (its own statistics cache is read with torch.load)
    monkeypatch.setattr(torch, "load", no_pickle)
    agent = build_agent({"name": "llm-trained", "adapter": str(adapter), "label": "llm-trained-tiny"})
    agent.configure(workdir=tmp_path)
    allocation = agent.allocate(ctx, 0.5, seed=0)
    assert len(allocation) == len(ctx.units) and ctx.weighted_sparsity(allocation) == pytest.approx(0.5, abs=1e-6)
    assert agent.last_info["llm"]["mode"] == "oneshot" and agent.deterministic
    transcript = tmp_path / "transcripts" / "llm-trained-tiny-t0.5-s0.jsonl"
    record = json.loads(transcript.read_text().splitlines()[-1])
    assert record["attempts"] and "raw" in record["attempts"][0] and record["ratios"] == allocation


def test_a_pickled_adapter_is_refused(tmp_path):
    for name in ("adapter_config.json", "adapter_model.safetensors", "tuning.json"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ConfigError, match="pickled"):
        build_agent({"name": "llm-trained", "adapter": str(tmp_path)})
    with pytest.raises(ConfigError, match="lacks"):
        build_agent({"name": "llm-trained", "adapter": str(tmp_path / "none")})
