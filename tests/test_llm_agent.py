"""agents.llm.LLMAgent: the decision loop (memory, self-reflection, repair, re-ask, fallback, rollbacks),
one-shot allocation, config checks, and the local backend's candidate scoring.

The env is a fake with exactly the IterativePrune-v0 API the agent uses (tests/llm_fakes.py); the HTTP
backend is covered in test_llm_http.py; the local backend runs on a tiny random Llama.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from llm_fakes import FakeIterativeEnv, ScriptedBackend, move, read_jsonl

from agents.base import build_agent
from agents.llm import ChatBackend, LLMAgent, LLMBackendError, LocalBackendConfig, LocalChatBackend
from agents.llm.parsing import parse_move
from prune_env.config_files import ConfigError


def test_rollback_in_memory_and_repeat_rejected(tmp_path):
    env = FakeIterativeEnv(rollback_on={1}, target=0.05)
    backend = ScriptedBackend([
        move("model.layers.1", "model.layers.5", rationale="cheapest two"),  # rolled back by env
        move("model.layers.5", "model.layers.1", rationale="again"),  # identical set -> rejected
        move("model.layers.1", rationale="only the cheapest"),
        move("model.layers.5", "model.layers.4"),
    ])
    summary = LLMAgent(backend).run_iterative_episode(env, transcript_path=tmp_path / "t.jsonl")
    assert env.actions == [[1, 5], [1], [4, 5]]
    assert summary["rollbacks"] == 1 and summary["invalid_answers"] == 1
    second = backend.prompts[1][-1]["content"]
    assert "#1 units [model.layers.1, model.layers.5]" in second and "ROLLED BACK" in second
    assert 'Your rationale: "cheapest two"' in second
    assert "fact acc 0.800 -> 0.700 (-0.100)" in second
    assert "rolled back in the previous step" in backend.prompts[2][-1]["content"]
    third = backend.prompts[3][-1]["content"]
    assert "#2 units [model.layers.1]" in third and "accepted, global sparsity 0.0% -> 1.7%" in third
    assert "budget left" in third and "Sensitivity profile" in third


def test_invalid_answers_reask_then_fall_back_avoiding_the_rolled_back_units(tmp_path):
    env = FakeIterativeEnv(rollback_on={1}, target=0.1)
    backend = ScriptedBackend([move("model.layers.1"), "nope", "still {not json", '{"units": []}'],
                              default=move("model.layers.3", rationale="finish"))
    path = tmp_path / "t.jsonl"
    summary = LLMAgent(backend, agent={"max_invalid": 3}).run_iterative_episode(env, transcript_path=path)
    assert env.actions[:2] == [[1], [0, 2, 4, 5]]  # the fallback skips unit 1, rolled back one step before
    assert summary["fallbacks"] == 1 and summary["invalid_answers"] == 3
    reask = backend.prompts[2]
    assert reask[-2] == {"role": "assistant", "content": "nope"} and "Your answer was invalid" in reask[-1]["content"]
    step = read_jsonl(path)[2]
    assert step["source"] == "fallback:zscore-greedy" and step["fallback_reason"] == "3 invalid answer(s)"
    assert [a["raw"] for a in step["attempts"]] == ["nope", "still {not json", '{"units": []}']


def test_invalid_answers_stay_bounded_in_prompts_and_transcript(tmp_path):
    huge = "no JSON here " * 2_000_000  # 26 MB, twice
    backend = ScriptedBackend([huge, huge], default=move("model.layers.1", "model.layers.5"))
    path = tmp_path / "t.jsonl"
    summary = LLMAgent(backend).run_iterative_episode(FakeIterativeEnv(target=0.03), transcript_path=path)
    assert summary["invalid_answers"] == 2 and summary["fallbacks"] == 0
    third_prompt = backend.prompts[2]
    assert sum(len(m["content"]) for m in third_prompt) < 30_000
    assert "[truncated: 25998000 more characters]" in third_prompt[2]["content"]
    assert path.stat().st_size < 200_000
    step = read_jsonl(path)[1]
    assert step["attempts"][0]["raw"].endswith("[truncated: 25980000 more characters]")


def test_memory_is_bounded():
    env = FakeIterativeEnv(target=0.5, increment=0.05)
    backend = ScriptedBackend([], default=move("model.layers.0"))  # always one unit: slow progress
    summary = LLMAgent(backend, agent={"memory_size": 2, "max_iterations": 4}).run_iterative_episode(env)
    assert summary["stopped"].startswith("max_iterations") and summary["iterations"] == 4
    last = backend.prompts[-1][-1]["content"]
    assert "1 earlier move(s) omitted" in last and "#1 " not in last and "#3 " in last


def test_transcript_flushed_per_iteration(tmp_path):
    path = tmp_path / "t.jsonl"
    env = FakeIterativeEnv(target=0.5, fail_on_step=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        LLMAgent(ScriptedBackend([], default=move("model.layers.2"))).run_iterative_episode(env, transcript_path=path)
    recs = read_jsonl(path)
    assert [r["event"] for r in recs] == ["start", "step", "step"]
    assert recs[1]["attempts"][0]["raw"] == move("model.layers.2")
    assert recs[2]["outcome"]["info"]["ppl"] > 0


def test_backend_errors_fall_back_by_default_and_open_the_circuit():
    backend = ScriptedBackend([], default=LLMBackendError("server down"))
    agent = LLMAgent(backend, agent={"circuit_breaker": 2})
    summary = agent.run_iterative_episode(FakeIterativeEnv(target=0.5))
    assert summary["terminated"] and summary["fallbacks"] == summary["iterations"] > 2
    assert len(backend.prompts) == 2  # no request once the circuit is open
    assert summary["backend_failures"] == 2 and summary["circuit_open"] and summary["circuit_opened_at"] == 2
    # a new episode closes the circuit again
    backend.default = move("model.layers.1")
    assert agent.run_iterative_episode(FakeIterativeEnv(target=0.03))["fallbacks"] == 0


def test_backend_error_is_logged_then_raised_when_asked(tmp_path):
    path = tmp_path / "t.jsonl"
    agent = LLMAgent(ScriptedBackend([LLMBackendError("boom at http://x")]), agent={"on_backend_error": "raise"})
    with pytest.raises(LLMBackendError, match="boom"):
        agent.run_iterative_episode(FakeIterativeEnv(), transcript_path=path)
    assert read_jsonl(path)[-1]["event"] == "error" and "boom" in read_jsonl(path)[-1]["backend_error"]


def test_candidate_scoring_path(tmp_path):
    class Chooser(ChatBackend):
        name = "chooser"
        chooses = True

        def __init__(self):
            super().__init__()
            self.calls = []

        def complete(self, messages, *, schema_hint=None):
            raise AssertionError("free-form generation must not be used")

        def choose(self, messages, candidates):
            self.calls.append(candidates)
            return len(candidates) - 1

    env = FakeIterativeEnv(target=0.05, rollback_on={1})
    backend = Chooser()
    summary = LLMAgent(backend).run_iterative_episode(env, transcript_path=tmp_path / "t.jsonl")
    assert summary["mode"] == "candidate-scoring" and summary["fallbacks"] == 0 and summary["terminated"]
    for cands in backend.calls:
        for c in cands:
            assert parse_move(c, env.profile_table(), max_sparsity=0.5, max_units=4).ok
    first = [json.loads(c)["units"] for c in backend.calls[0]]
    assert first[0] == ["model.layers.1", "model.layers.5", "model.layers.4", "model.layers.2"]
    assert ["model.layers.1"] in first
    # after the rollback of move 1, candidates avoid repeating it exactly
    rolled = set(json.loads(backend.calls[0][-1])["units"])
    assert all(set(json.loads(c)["units"]) != rolled for c in backend.calls[1])
    step = read_jsonl(tmp_path / "t.jsonl")[1]
    assert step["mode"] == "candidate-scoring" and step["source"] == "candidate-scoring"
    assert "candidate scoring" in step["attempts"][0]["note"]


def test_oneshot_repairs_and_budget_matches(tmp_path):
    table = FakeIterativeEnv().profile_table()
    numel = [100, 200, 300, 100, 200, 100]
    answer = json.dumps({"ratios": {"model.layers.0": 0.3, "model.layers.1": "70%", "model.layers.2": 0.5,
                                    "model.layers.3": 1.7, "model.layers.4": 0.6, "bogus": 0.9},
                         "rationale": "more on cheap layers"})
    agent = LLMAgent(ScriptedBackend(["not json", answer]))
    ratios = agent.allocate_oneshot(table, numel, 0.5, tmp_path / "a.jsonl")
    assert len(ratios) == 6 and all(0.0 <= r <= 0.95 for r in ratios)
    assert np.dot(ratios, numel) / sum(numel) == pytest.approx(0.5, abs=1e-6)
    assert ratios[1] > ratios[2] > ratios[0]  # the order of the answer survives the budget shift
    rec = read_jsonl(tmp_path / "a.jsonl")[-1]
    assert rec["event"] == "allocate" and rec["source"] == "llm-repaired"
    notes = " | ".join(rec["attempts"][1]["repairs"])
    assert "percentage" in notes and "bogus" in notes and "filled 1 missing" in notes and "clipped" not in notes
    assert "malformed" in rec["attempts"][0]["error"] or "no JSON" in rec["attempts"][0]["error"]


def test_oneshot_fallback_to_zscore():
    agent = LLMAgent(ScriptedBackend([], default="???"), agent={"max_invalid": 2})
    ratios = agent.allocate_oneshot(FakeIterativeEnv().profile_table(), [1] * 6, 0.4)
    assert agent.fallbacks == 1
    assert np.mean(ratios) == pytest.approx(0.4, abs=1e-6)
    assert ratios[1] == max(ratios) and ratios[3] == min(ratios)  # lowest z_sum pruned most
    failing = LLMAgent(ScriptedBackend([LLMBackendError("down")]))
    assert np.mean(failing.allocate_oneshot(FakeIterativeEnv().profile_table(), [1] * 6, 0.4)) == pytest.approx(0.4)
    assert failing.fallbacks == 1 and failing.backend_failures == 1


@pytest.mark.parametrize("config, message", [
    ({"mode": "greedy"}, "llm mode"),
    ({"backend": {"type": "vllm"}}, "llm backend type"),
    ({"backend": {"type": "openai", "timout": 2}}, "unknown llm backend (openai) option(s) ['timout']"),
    ({"backend": {"type": "openai", "request_timeout": 0}}, "request_timeout=0"),
    ({"backend": {"type": "openai", "max_response_bytes": "1MB"}}, "max_response_bytes"),
    ({"backend": {"type": "local", "max_new_tokens": 0}}, "max_new_tokens=0"),
    ({"agent": {"circuit_breaker": 0}}, "circuit_breaker=0"),
    ({"agent": {"on_backend_error": "ignore"}}, "on_backend_error"),
    ({"agent": {"seed": 1}}, "unknown llm agent option(s) ['seed']"),
    ({"env": [1]}, "llm env options must be a mapping"),
    ({"backend": {"type": "openai", "base_url": "htp://127.0.0.1:8000/v1"}}, "scheme 'htp', not http or https"),
    ({"backend": {"type": "openai", "base_url": "http://u:pw@h/v1"}}, "holds credentials"),
])
def test_bad_config_is_refused_when_the_agent_is_built(config, message):
    with pytest.raises(ValueError, match=None) as info:
        build_agent({"name": "llm", **config})
    assert message in str(info.value)


def test_a_served_model_needs_an_id_and_a_valid_url_from_config_or_environment(monkeypatch):
    from agents.llm.options import check_backend

    for name in ("OPENAI_MODEL", "PRUNE_GYM_LLM_MODEL", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    for mapping in (None, {"type": "openai", "base_url": "http://127.0.0.1:9/v1"}):
        with pytest.raises(ConfigError, match="needs a model id: set backend.model, or OPENAI_MODEL"):
            check_backend(mapping)
    check_backend({"type": "local"})  # the local model needs no server
    monkeypatch.setenv("OPENAI_MODEL", "served-model")
    check_backend(None)
    monkeypatch.setenv("OPENAI_BASE_URL", "localhost:8000/v1")
    with pytest.raises(ConfigError, match="OPENAI_BASE_URL='localhost:8000/v1' has scheme"):
        check_backend(None)


def test_moves_picked_by_the_fallback_are_counted_and_flagged():
    big = '{"units": [' + "1" * 400 + "]}"  # more digits than a float holds: a malformed answer, not a crash
    agent = LLMAgent(ScriptedBackend([], default=big), agent={"max_invalid": 2})
    summary = agent.run_iterative_episode(FakeIterativeEnv(target=0.1))
    assert summary["moves"] == summary["fallback_moves"] == summary["iterations"] > 1 and summary["all_fallback"]
    assert summary["invalid_answers"] == 2 * summary["moves"]
    mixed = LLMAgent(ScriptedBackend([move("model.layers.1")], default="???"), agent={"max_invalid": 1})
    summary = mixed.run_iterative_episode(FakeIterativeEnv(target=0.1))
    assert summary["fallback_moves"] == summary["moves"] - 1 and summary["all_fallback"] is False
    oneshot = LLMAgent(ScriptedBackend([], default=big), agent={"max_invalid": 1})
    oneshot.allocate_oneshot(FakeIterativeEnv().profile_table(), [1] * 6, 0.4)
    assert oneshot._health()["all_fallback"] is True and oneshot._health()["moves"] == 1


def test_registry_builds_the_one_llm_agent_class():
    agent = build_agent({"name": "llm", "label": "llm-json", "backend": {"type": "openai", "model": "m"}})
    assert type(agent) is LLMAgent and agent.name == "llm-json" and agent.options.on_backend_error == "fallback"
    with pytest.raises(ConfigError):
        LLMAgent(backend="openai")


def test_only_the_non_sampling_local_backend_is_seed_independent():
    """The benchmark reuses a deterministic agent's first seed for the others (a served model may sample)."""
    local = build_agent({"name": "llm", "backend": {"type": "local", "model": "tiny-llama"}})
    served = build_agent({"name": "llm", "backend": {"type": "openai", "base_url": "http://127.0.0.1:9/v1"}})
    assert local.deterministic is True and served.deterministic is False


# --------------------------------------------------------------------------- local backend


class CharTokenizer:
    chat_template = None
    eos_token = "\x03"
    eos_token_id = 3
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [min(ord(c), 255) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(int(i)) for i in ids)


@pytest.fixture(scope="module")
def tiny_pair():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
    return LlamaForCausalLM(cfg).eval(), CharTokenizer()


def test_local_backend_scores_match_full_forward(tiny_pair):
    import torch

    model, tok = tiny_pair
    backend = LocalChatBackend(LocalBackendConfig(name="tiny"), loaded=(model, tok))
    messages = [{"role": "system", "content": "pick"}, {"role": "user", "content": "which?"}]
    cands = ['{"units": ["a"]}', '{"units": ["b", "c"]}', "x"]
    scores = backend.score(messages, cands)
    prompt = tok(backend._prompt_text(messages))["input_ids"]
    for cand, s in zip(cands, scores):
        ids = tok(cand)["input_ids"] + [3]
        x = torch.tensor([prompt + ids])
        with torch.no_grad():
            lp = torch.log_softmax(model(x).logits[0].float(), -1)
        ref = sum(lp[len(prompt) - 1 + j, t].item() for j, t in enumerate(ids))
        assert s == pytest.approx(ref, abs=1e-3)
    assert backend.choose(messages, cands) == int(np.argmax(scores))
    assert isinstance(backend.complete(messages), str)


def test_local_backend_drives_agent_deterministically(tiny_pair, tmp_path):
    backend = LocalChatBackend(LocalBackendConfig(name="tiny", max_new_tokens=4), loaded=tiny_pair)
    agent = LLMAgent(backend)
    assert agent.deterministic
    runs = []
    for i in range(2):
        env = FakeIterativeEnv(target=0.1)
        summary = agent.run_iterative_episode(env, transcript_path=tmp_path / f"t{i}.jsonl")
        assert summary["mode"] == "candidate-scoring" and summary["terminated"] and summary["fallbacks"] == 0
        runs.append(env.actions)
    assert runs[0] == runs[1]
    step = read_jsonl(tmp_path / "t0.jsonl")[1]
    assert len(step["attempts"][0]["scores"]) == len(step["attempts"][0]["candidates"])
    assert step["attempts"][0]["chosen"] == int(np.argmax(step["attempts"][0]["scores"]))


@pytest.mark.slow
def test_smollm2_candidate_scoring_real_model(tmp_path):
    pytest.importorskip("gguf")
    from prune_env.models import ModelSpecError, resolve_model_spec

    try:
        resolve_model_spec("smollm2-135m")
    except ModelSpecError as exc:
        pytest.skip(str(exc))
    env = FakeIterativeEnv(target=0.01)  # one step ends the episode: exactly one choose() call
    summary = LLMAgent({"type": "local"}).run_iterative_episode(env, transcript_path=tmp_path / "t.jsonl")
    assert summary["iterations"] == 1 and summary["terminated"]
    assert summary["mode"] == "candidate-scoring" and summary["fallbacks"] == 0
    step = read_jsonl(tmp_path / "t.jsonl")[1]
    scores = step["attempts"][0]["scores"]
    assert len(scores) == len(step["attempts"][0]["candidates"]) >= 3
    assert all(math.isfinite(s) and s < 0 for s in scores)
    assert step["units"] and set(step["units"]) <= set(env.unit_names)
    assert env.actions and len(env.actions[0]) == len(step["units"])
