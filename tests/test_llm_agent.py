"""Tests for agents.llm_backends and agents.llm_agent (fake env, scripted HTTP server).

Everything except the ``slow`` test runs without a real model: the OpenAI backend talks to a
scripted http.server on 127.0.0.1, the local backend's scoring is checked on a tiny random
Llama with a character tokenizer.
"""

from __future__ import annotations

import json
import math
import socket
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from agents.llm_agent import (  # noqa: E402
    LLMPruningAgent,
    extract_json_object,
    parse_allocation,
    parse_move,
    zscore_greedy,
)
from agents.llm_backends import LLMBackendError, LocalChatBackend, OpenAIChatBackend  # noqa: E402
from fake_openai_server import Reply, ScriptedOpenAIServer  # noqa: E402

# --------------------------------------------------------------------------------------
# fake IterativePrune env implementing exactly the contract the agent relies on
# --------------------------------------------------------------------------------------

Z_WANDA = [0.5, -1.0, -0.2, 1.2, -0.5, 0.0]
Z_GRAD = [0.3, -0.4, 0.1, 0.9, 0.2, -1.1]
# z_sum = [0.8, -1.4, -0.1, 2.1, -0.3, -1.1] -> ascending order: 1, 5, 4, 2, 0, 3


class FakeIterativeEnv(gym.Env):
    def __init__(self, n_units=6, increment=0.1, target=0.15, max_sparsity=0.5,
                 rollback_on=(), fail_on_step=None, max_steps=20):
        self.unit_names = [f"model.layers.{i}" for i in range(n_units)]
        self.increment = increment
        self.target_sparsity = target
        self.max_sparsity = max_sparsity
        self.rollback_on = set(rollback_on)
        self.fail_on_step = fail_on_step
        self.max_steps = max_steps
        self.action_space = gym.spaces.MultiBinary(n_units)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (n_units * 3,), np.float32)
        self.share = np.full(n_units, 1.0 / n_units)
        self.actions: list[list[int]] = []
        self.reset()

    @property
    def global_sparsity(self) -> float:
        return float((self.sparsity * self.share).sum())

    def _ppl(self, sp):
        return 10.0 * math.exp(float((sp ** 2).sum()))

    def _obs(self):
        return np.concatenate([Z_WANDA[: len(self.sparsity)], Z_GRAD[: len(self.sparsity)],
                               self.sparsity]).astype(np.float32)

    def profile_table(self):
        return [{"unit": n, "index": i, "z_wanda": Z_WANDA[i], "z_grad": Z_GRAD[i],
                 "sparsity": float(self.sparsity[i]), "param_share": float(self.share[i])}
                for i, n in enumerate(self.unit_names)]

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.sparsity = np.zeros(len(self.unit_names))
        self.steps = 0
        self.rollbacks = 0
        self.ppl = self._ppl(self.sparsity)
        return self._obs(), {"ppl": self.ppl, "fact_acc": 0.8}

    def step(self, action):
        self.steps += 1
        if self.fail_on_step == self.steps:
            raise RuntimeError("simulated crash")
        a = np.asarray(action).astype(bool)
        self.actions.append([int(i) for i in np.flatnonzero(a)])
        new = np.minimum(self.sparsity + a * self.increment, self.max_sparsity)
        new_ppl = self._ppl(new)
        ppl_before = self.ppl
        rolled = self.steps in self.rollback_on
        if rolled:
            new_ppl = ppl_before * 1.5  # the rejected attempt's perplexity
            self.rollbacks += 1
        else:
            self.sparsity = new
            self.ppl = new_ppl
        g = self.global_sparsity
        acc = 0.8 - 0.5 * g - (0.1 if rolled else 0.0)
        info = {"ppl": new_ppl, "fact_acc": acc, "fact_nll": 1.0 + g, "fact_retention": 1.0 - g,
                "achieved_sparsity": g, "rolled_back": rolled, "rollbacks": self.rollbacks,
                "ppl_increase": new_ppl / ppl_before - 1.0}
        terminated = g >= self.target_sparsity - 1e-9
        truncated = self.steps >= self.max_steps
        return self._obs(), -math.log(new_ppl / 10.0), terminated, truncated, info


class ScriptedBackend:
    """In-process backend returning answers in order (records every prompt)."""

    name = "scripted"

    def __init__(self, answers, default=None):
        self.answers = list(answers)
        self.default = default
        self.prompts: list[list[dict]] = []

    def complete(self, messages, *, schema_hint=None):
        self.prompts.append([dict(m) for m in messages])
        if self.answers:
            a = self.answers.pop(0)
        else:
            a = self.default
        if isinstance(a, Exception):
            raise a
        return a


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def move(*units, rationale="r"):
    return json.dumps({"units": list(units), "rationale": rationale})


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# --------------------------------------------------------------------------------------
# parsing / repair
# --------------------------------------------------------------------------------------


def test_extract_json_object_tolerates_prose_fences_and_think():
    text = '<think>maybe {"units": ["x"]}</think>Sure:\n```json\n{"units": ["a"], "rationale": "b {c}"}\n```'
    obj, err = extract_json_object(text)
    assert err is None and obj == {"units": ["a"], "rationale": "b {c}"}
    obj, err = extract_json_object('{"units": ["a",]')
    assert obj is None and "malformed" in err
    assert extract_json_object("")[1] == "the answer was empty"
    assert extract_json_object("no json here")[0] is None


def test_parse_move_repairs():
    env = FakeIterativeEnv()
    env.sparsity[3] = env.max_sparsity  # capped
    table = env.profile_table()
    text = ('ok {"units": ["model.layers.1", "bogus", "MODEL.LAYERS.1", 5, "#2", "model.layers.3", '
            '"model.layers.0", "model.layers.4"], "rationale": "cheap ones"}')
    p = parse_move(text, table, max_sparsity=env.max_sparsity, max_units=4)
    assert p.ok, p.error
    assert p.units == ["model.layers.1", "model.layers.5", "model.layers.2", "model.layers.0"]
    notes = " | ".join(p.repairs)
    assert "dropped unknown unit 'bogus'" in notes
    assert "removed duplicate model.layers.1" in notes
    assert "index 5" in notes and "already at the max sparsity" in notes and "truncated 5 units" in notes
    assert p.rationale == "cheap ones"

    bad = parse_move('{"units": ["nope", "model.layers.3"]}', table, max_sparsity=0.5, max_units=4)
    assert not bad.ok and "no valid unit remained" in bad.error
    assert "no \"units\"" in parse_move('{"foo": 1}', table, max_sparsity=0.5, max_units=4).error
    lst = parse_move('["model.layers.2"]', table, max_sparsity=0.5, max_units=4)
    assert lst.ok and lst.units == ["model.layers.2"]


def test_zscore_greedy_respects_cap_and_blocked():
    env = FakeIterativeEnv()
    env.sparsity[1] = env.max_sparsity
    t = env.profile_table()
    assert zscore_greedy(t, 0.5, 2) == ["model.layers.5", "model.layers.4"]
    assert zscore_greedy(t, 0.5, 2, blocked={"model.layers.5"}) == ["model.layers.4", "model.layers.2"]


# --------------------------------------------------------------------------------------
# OpenAI backend against the scripted HTTP server
# --------------------------------------------------------------------------------------


def test_agent_over_http_repair_retry_fallback_and_rollback(tmp_path):
    script = [
        "Sure! {units: [model.layers.1",  # iteration 1: malformed -> re-ask
        move("model.layers.1", "model.layers.99", "MODEL.LAYERS.1", 5, rationale="lowest z"),  # repaired
        Reply(sleep=1.5, content=move("model.layers.0")),  # iteration 2: client timeout -> retry
        Reply(status=500),  # -> retry
        move("model.layers.4", rationale="try 4"),  # accepted by the agent, rolled back by the env
        "nope", "still {not json", '{"units": []}',  # iteration 3: three invalid -> fallback
    ]
    default = move("model.layers.3", "model.layers.4", "model.layers.2", rationale="finish")
    transcript = tmp_path / "run" / "transcript.jsonl"
    env = FakeIterativeEnv(rollback_on={2})
    with ScriptedOpenAIServer(script, default=default) as srv:
        backend = OpenAIChatBackend(base_url=srv.url, model="test-model", timeout=0.5, max_retries=3,
                                    backoff=0.01)
        agent = LLMPruningAgent(backend, max_units_per_step=4, max_invalid=3, transcript_path=transcript)
        t0 = time.perf_counter()
        summary = agent.run(env, seed=0)
        assert time.perf_counter() - t0 < 10
        n_requests = len(srv.requests)
        reask = srv.messages(1)
        iter3_prompt = srv.messages(5)[-1]["content"]

    assert env.actions == [[1, 5], [4], [0, 1, 2, 5], [2, 3, 4]]
    assert summary["iterations"] == 4 and summary["terminated"] and not summary["truncated"]
    assert summary["rollbacks"] == 1 and summary["fallbacks"] == 1
    assert summary["invalid_answers"] == 4 and summary["repaired_answers"] == 1
    assert summary["llm_model"] == "test-model" and summary["transcript"] == str(transcript)
    assert summary["final_info"]["achieved_sparsity"] == pytest.approx(0.15)
    assert n_requests == 9  # 2 + 3 + 3 + 1

    # the re-ask carries the error; the prompt after the rollback shows it in the memory
    assert reask[-2] == {"role": "assistant", "content": script[0]}
    assert "Your answer was invalid" in reask[-1]["content"] and "malformed" in reask[-1]["content"]
    assert "#2 units [model.layers.4]" in iter3_prompt and "ROLLED BACK" in iter3_prompt
    assert 'Your rationale: "try 4"' in iter3_prompt and "Reflect on this memory" in iter3_prompt
    assert "ppl 10.20 -> 15.30 (+50.0%)" in iter3_prompt

    recs = read_jsonl(transcript)
    assert [r["event"] for r in recs] == ["start", "step", "step", "step", "step", "end"]
    s1, s2, s3, s4 = recs[1:5]
    assert s1["source"] == "llm-repaired" and len(s1["attempts"]) == 2
    assert "malformed" in s1["attempts"][0]["error"]
    assert any("model.layers.99" in n for n in s1["attempts"][1]["repairs"])
    assert any("duplicate" in n for n in s1["repairs"])
    assert s1["attempts"][0]["prompt"][0]["role"] == "system"
    assert s1["attempts"][1]["raw"] == script[1]
    assert s2["attempts"][0]["backend_attempts"] == 3
    errs = s2["attempts"][0]["backend_errors"]
    assert "timeout" in errs[0] and "HTTP 500" in errs[1]
    assert s2["outcome"]["info"]["rolled_back"] is True and s2["memory_entry"]["rolled_back"] is True
    assert s3["source"] == "fallback:zscore-greedy" and len(s3["attempts"]) == 3
    assert s3["units"] == ["model.layers.1", "model.layers.5", "model.layers.2", "model.layers.0"]
    assert "model.layers.4" not in s3["units"]  # the unit of the rolled-back move is avoided
    assert "no valid unit remained" in s3["attempts"][2]["error"]
    assert s4["source"] == "llm" and recs[-1]["summary"]["fallbacks"] == 1


def test_unreachable_endpoint_raises_quickly_with_url():
    url = f"http://127.0.0.1:{closed_port()}/v1"
    backend = OpenAIChatBackend(base_url=url, model="m", timeout=1.0, max_retries=2, backoff=0.05)
    t0 = time.perf_counter()
    with pytest.raises(LLMBackendError) as ei:
        backend.complete([{"role": "user", "content": "hi"}], schema_hint=None)
    assert time.perf_counter() - t0 < 5
    msg = str(ei.value)
    assert url + "/chat/completions" in msg and "3 attempt" in msg
    assert "connection error" in msg and "server is running" in msg and "base_url" in msg


def test_agent_backend_error_is_logged_then_raised(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/v1"
    backend = OpenAIChatBackend(base_url=url, model="m", timeout=1.0, max_retries=0)
    path = tmp_path / "t.jsonl"
    with pytest.raises(LLMBackendError):
        LLMPruningAgent(backend, transcript_path=path).run(FakeIterativeEnv())
    recs = read_jsonl(path)
    assert recs[-1]["event"] == "error" and url in recs[-1]["backend_error"]
    # on_backend_error="fallback" keeps playing with zscore-greedy
    summary = LLMPruningAgent(backend, on_backend_error="fallback").run(FakeIterativeEnv())
    assert summary["terminated"] and summary["fallbacks"] == summary["iterations"]


def test_backend_http_details(monkeypatch):
    monkeypatch.delenv("OPENAI_MODEL", raising=False)
    with ScriptedOpenAIServer([
        Reply(status=429, headers={"Retry-After": "0"}),
        '{"units": ["a"]}',
        Reply(status=400),
    ]) as srv:
        monkeypatch.setenv("OPENAI_BASE_URL", srv.url + "/")
        monkeypatch.setenv("PRUNE_GYM_LLM_MODEL", "env-model")
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        b = OpenAIChatBackend(json_mode=True, backoff=0.01, temperature=0.0)
        assert b.name == "env-model" and b.url == srv.url + "/chat/completions"
        out = b.complete([{"role": "user", "content": "x"}], schema_hint="{}")
        assert out == '{"units": ["a"]}'
        body = srv.requests[1]["body"]
        assert body["model"] == "env-model" and body["temperature"] == 0.0
        assert body["response_format"] == {"type": "json_object"}
        assert body["messages"] == [{"role": "user", "content": "x"}]
        assert srv.requests[1]["headers"]["Authorization"] == "Bearer sk-test"
        assert b.request_log[-1]["attempts"] == 2 and "HTTP 429" in b.request_log[-1]["errors"][0]
        with pytest.raises(LLMBackendError, match="HTTP 400"):  # 4xx: no retry
            b.complete([{"role": "user", "content": "x"}], schema_hint=None)
        assert len(srv.requests) == 3
    monkeypatch.delenv("PRUNE_GYM_LLM_MODEL")
    with pytest.raises(ValueError, match="OPENAI_MODEL"):
        OpenAIChatBackend()


def test_backend_drops_rejected_json_mode():
    rejected = b'{"error": {"message": "response_format is not supported by this server"}}'
    with ScriptedOpenAIServer([Reply(status=400, raw_body=rejected), "fine"]) as srv:
        b = OpenAIChatBackend(base_url=srv.url, model="m", api_key="", json_mode=True, max_retries=0)
        assert b.complete([{"role": "user", "content": "x"}], schema_hint="{}") == "fine"
        assert "response_format" in srv.requests[0]["body"]
        assert "response_format" not in srv.requests[1]["body"]
        assert "Authorization" not in srv.requests[1]["headers"]


# --------------------------------------------------------------------------------------
# memory / rollback / transcript with an in-process backend
# --------------------------------------------------------------------------------------


def test_rollback_in_memory_and_repeat_rejected(tmp_path):
    env = FakeIterativeEnv(rollback_on={1}, target=0.05)
    backend = ScriptedBackend([
        move("model.layers.1", "model.layers.5", rationale="cheapest two"),  # rolled back by env
        move("model.layers.5", "model.layers.1", rationale="again"),  # identical set -> rejected
        move("model.layers.1", rationale="only the cheapest"),
        move("model.layers.5", "model.layers.4"),
    ])
    summary = LLMPruningAgent(backend, transcript_path=tmp_path / "t.jsonl").run(env)
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


def test_memory_is_bounded():
    env = FakeIterativeEnv(target=0.5, increment=0.05)
    backend = ScriptedBackend([], default=move("model.layers.0"))  # always one unit: slow progress
    agent = LLMPruningAgent(backend, memory_size=2, max_iterations=4)
    summary = agent.run(env)
    assert summary["stopped"].startswith("max_iterations") and summary["iterations"] == 4
    last = backend.prompts[-1][-1]["content"]
    assert "1 earlier move(s) omitted" in last and "#1 " not in last and "#3 " in last


def test_transcript_flushed_per_iteration(tmp_path):
    path = tmp_path / "t.jsonl"
    env = FakeIterativeEnv(target=0.5, fail_on_step=3)
    backend = ScriptedBackend([], default=move("model.layers.2"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        LLMPruningAgent(backend, transcript_path=path).run(env)
    recs = read_jsonl(path)
    assert [r["event"] for r in recs] == ["start", "step", "step"]
    assert recs[1]["attempts"][0]["raw"] == move("model.layers.2")
    assert recs[2]["outcome"]["info"]["ppl"] > 0


def test_candidate_scoring_path(tmp_path):
    class Chooser:
        name = "chooser"

        def __init__(self):
            self.calls = []

        def complete(self, messages, *, schema_hint=None):
            raise AssertionError("free-form generation must not be used")

        def choose(self, messages, candidates):
            self.calls.append(candidates)
            return len(candidates) - 1

    env = FakeIterativeEnv(target=0.05, rollback_on={1})
    backend = Chooser()
    summary = LLMPruningAgent(backend, transcript_path=tmp_path / "t.jsonl").run(env)
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


# --------------------------------------------------------------------------------------
# allocate (LayerPrune-v0)
# --------------------------------------------------------------------------------------


def test_allocate_repairs_and_budget_matches(tmp_path):
    table = FakeIterativeEnv().profile_table()
    numel = [100, 200, 300, 100, 200, 100]
    answer = json.dumps({"ratios": {"model.layers.0": 0.3, "model.layers.1": "70%", "model.layers.2": 0.5,
                                    "model.layers.3": 1.7, "model.layers.4": 0.6, "bogus": 0.9},
                         "rationale": "more on cheap layers"})
    backend = ScriptedBackend(["not json", answer])
    agent = LLMPruningAgent(backend, transcript_path=tmp_path / "a.jsonl")
    ratios = agent.allocate(table, numel, 0.5)
    assert len(ratios) == 6 and all(0.0 <= r <= 0.95 for r in ratios)
    assert np.dot(ratios, numel) / sum(numel) == pytest.approx(0.5, abs=1e-6)
    assert ratios[1] > ratios[2] > ratios[0]  # the order of the answer survives the budget shift
    rec = read_jsonl(tmp_path / "a.jsonl")[-1]
    assert rec["event"] == "allocate" and rec["source"] == "llm-repaired"
    notes = " | ".join(rec["attempts"][1]["repairs"])
    assert "percentage" in notes and "bogus" in notes and "filled 1 missing" in notes and "clipped" not in notes
    assert "malformed" in rec["attempts"][0]["error"] or "no JSON" in rec["attempts"][0]["error"]

    vals, _, repairs, err = parse_allocation('{"ratios": {"model.layers.0": 0.2}}', table)
    assert vals is None and "only 1 of 6" in err


def test_allocate_fallback_to_zscore(tmp_path):
    table = FakeIterativeEnv().profile_table()
    numel = [1] * 6
    agent = LLMPruningAgent(ScriptedBackend([], default="???"), max_invalid=2)
    ratios = agent.allocate(table, numel, 0.4)
    assert agent.fallbacks == 1
    assert np.mean(ratios) == pytest.approx(0.4, abs=1e-6)
    assert ratios[1] == max(ratios) and ratios[3] == min(ratios)  # lowest z_sum pruned most


# --------------------------------------------------------------------------------------
# local backend: scoring on a tiny random model (fast) and on SmolLM2 (slow)
# --------------------------------------------------------------------------------------


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
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
    return LlamaForCausalLM(cfg).eval(), CharTokenizer()


def test_local_backend_scores_match_full_forward(tiny_pair):
    import torch

    model, tok = tiny_pair
    backend = LocalChatBackend(loaded=(model, tok), name="tiny")
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


def test_local_backend_drives_agent(tiny_pair, tmp_path):
    backend = LocalChatBackend(loaded=tiny_pair, name="tiny", max_new_tokens=4)
    env = FakeIterativeEnv(target=0.05)
    summary = LLMPruningAgent(backend, transcript_path=tmp_path / "t.jsonl").run(env)
    assert summary["mode"] == "candidate-scoring" and summary["terminated"] and summary["fallbacks"] == 0
    step = read_jsonl(tmp_path / "t.jsonl")[1]
    assert len(step["attempts"][0]["scores"]) == len(step["attempts"][0]["candidates"])


@pytest.mark.slow
def test_smollm2_candidate_scoring_real_model(tmp_path):
    pytest.importorskip("gguf")
    from prune_env.models import ModelSpecError, resolve_model_spec

    try:
        resolve_model_spec("smollm2-135m")
    except ModelSpecError as exc:
        pytest.skip(str(exc))
    backend = LocalChatBackend("smollm2-135m")
    env = FakeIterativeEnv(target=0.01)  # one step ends the episode: exactly one choose() call
    summary = LLMPruningAgent(backend, transcript_path=tmp_path / "t.jsonl").run(env)
    assert summary["iterations"] == 1 and summary["terminated"]
    assert summary["mode"] == "candidate-scoring" and summary["fallbacks"] == 0
    step = read_jsonl(tmp_path / "t.jsonl")[1]
    scores = step["attempts"][0]["scores"]
    assert len(scores) == len(step["attempts"][0]["candidates"]) >= 3
    assert all(math.isfinite(s) and s < 0 for s in scores)
    assert step["units"] and set(step["units"]) <= set(env.unit_names)
    assert env.actions and len(env.actions[0]) == len(step["units"])


def test_llm_agent_is_reused_across_seeds_only_with_the_non_sampling_local_backend():
    from agents.base import build_agent
    from benchmark import plan_cells

    local = build_agent({"name": "llm", "backend": {"type": "local", "model": "tiny-llama"}})
    served = build_agent({"name": "llm", "backend": {"type": "openai", "base_url": "http://127.0.0.1:9/v1"}})
    assert local.deterministic is True and served.deterministic is False
    cells = plan_cells(["llm"], [0.5], [0, 1], {"llm": local.deterministic})
    assert [(c.seed, c.reuse_from) for c in cells] == [(0, None), (1, 0)]
    cells = plan_cells(["llm"], [0.5], [0, 1], {"llm": served.deterministic})
    assert [(c.seed, c.reuse_from) for c in cells] == [(0, None), (1, None)]
