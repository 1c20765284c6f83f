"""The OpenAI-compatible HTTP backend against a real loopback server (tests/fake_openai_server.py):
retries, backoff, Retry-After, the byte cap, the per-request deadline, and the agent's circuit breaker."""

from __future__ import annotations

import time

import pytest
from fake_openai_server import Reply, ScriptedOpenAIServer, redirect
from llm_fakes import FakeIterativeEnv, closed_port, move, read_jsonl

from agents.llm import HTTPBackendConfig, LLMAgent, LLMBackendError, OpenAIChatBackend

HI = [{"role": "user", "content": "hi"}]


def backend_for(url: str, **options) -> OpenAIChatBackend:
    return OpenAIChatBackend(HTTPBackendConfig(base_url=url, model="test-model", **{"backoff": 0.01, **options}))


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
        agent = LLMAgent(backend_for(srv.url, timeout=0.5, max_retries=3), agent={"max_invalid": 3})
        summary = agent.run_iterative_episode(env, seed=0, transcript_path=transcript)
        n_requests = len(srv.requests)
        reask = srv.messages(1)
        iter3_prompt = srv.messages(5)[-1]["content"]

    assert env.actions == [[1, 5], [4], [0, 1, 2, 5], [2, 3, 4]]
    assert summary["iterations"] == 4 and summary["terminated"] and not summary["truncated"]
    assert summary["rollbacks"] == 1 and summary["fallbacks"] == 1 and summary["backend_failures"] == 0
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


def test_unreachable_endpoint_raises_with_url_and_fix():
    url = f"http://127.0.0.1:{closed_port()}/v1"
    backend = backend_for(url, timeout=1.0, max_retries=2)
    with pytest.raises(LLMBackendError) as ei:
        backend.complete(HI)
    msg = str(ei.value)
    assert url + "/chat/completions" in msg and "3 attempt" in msg
    assert "connection error" in msg and "server is running" in msg and "base_url" in msg
    assert backend.last_request["attempts"] == 3 and len(backend.last_request["errors"]) == 3


def test_backend_http_details(monkeypatch):
    monkeypatch.delenv("OPENAI_MODEL", raising=False)
    with ScriptedOpenAIServer([Reply(status=429, headers={"Retry-After": "0"}), '{"units": ["a"]}',
                               Reply(status=400)]) as srv:
        monkeypatch.setenv("OPENAI_BASE_URL", srv.url + "/")
        monkeypatch.setenv("PRUNE_GYM_LLM_MODEL", "env-model")
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        b = OpenAIChatBackend(HTTPBackendConfig(json_mode=True, backoff=0.01))
        assert b.name == "env-model" and b.url == srv.url + "/chat/completions"
        assert b.complete([{"role": "user", "content": "x"}], schema_hint="{}") == '{"units": ["a"]}'
        body = srv.requests[1]["body"]
        assert body["model"] == "env-model" and body["temperature"] == 0.0
        assert body["response_format"] == {"type": "json_object"}
        assert body["messages"] == [{"role": "user", "content": "x"}]
        assert srv.requests[1]["headers"]["Authorization"] == "Bearer sk-test"
        assert b.last_request["attempts"] == 2 and "HTTP 429" in b.last_request["errors"][0]
        with pytest.raises(LLMBackendError, match="HTTP 400"):  # other 4xx: no retry
            b.complete([{"role": "user", "content": "x"}])
        assert len(srv.requests) == 3
    monkeypatch.delenv("PRUNE_GYM_LLM_MODEL")
    with pytest.raises(ValueError, match="OPENAI_MODEL"):
        OpenAIChatBackend()


def test_backend_drops_rejected_json_mode():
    rejected = b'{"error": {"message": "response_format is not supported by this server"}}'
    with ScriptedOpenAIServer([Reply(status=400, raw_body=rejected), "fine"]) as srv:
        b = backend_for(srv.url, api_key="", json_mode=True, max_retries=0)
        assert b.complete(HI, schema_hint="{}") == "fine"
        assert "response_format" in srv.requests[0]["body"]
        assert "response_format" not in srv.requests[1]["body"]
        assert "Authorization" not in srv.requests[1]["headers"]


def test_500_then_ok_is_retried_with_exponential_backoff_and_retry_after(monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr("agents.llm.openai_http.time.sleep", waits.append)
    script = [Reply(status=500), Reply(status=503), Reply(status=502, headers={"Retry-After": "7"}), "ok"]
    with ScriptedOpenAIServer(script) as srv:
        backend = backend_for(srv.url, backoff=0.5, max_backoff=5.0, max_retries=3)
        assert backend.complete(HI) == "ok"
    assert len(srv.requests) == 4 and backend.last_request["attempts"] == 4
    assert waits == [0.5, 1.0, 5.0]  # 0.5 * 2**i; Retry-After 7 s capped at max_backoff
    assert [e.split(":")[0] for e in backend.last_request["errors"]] == ["HTTP 500 Internal Server Error",
                                                                         "HTTP 503 Service Unavailable",
                                                                         "HTTP 502 Bad Gateway"]


@pytest.mark.parametrize("bad, error", [
    (Reply(raw_body=b"<html>502 from the proxy</html>"), "non-JSON response body"),
    (Reply(raw_body=b""), "empty response body"),
    (Reply(content="a long enough answer", truncate_to=20), "truncated response body: 20 of"),
    (Reply(hangup=True), "connection error"),
])
def test_broken_bodies_and_hangups_are_retried(bad, error):
    with ScriptedOpenAIServer([bad, "fine"]) as srv:
        backend = backend_for(srv.url, max_retries=1)
        assert backend.complete(HI) == "fine"
        assert len(srv.requests) == 2
    assert backend.last_request["attempts"] == 2 and error in backend.last_request["errors"][0]


def test_slow_drip_ends_at_the_request_deadline():
    # one byte every 20 ms: every read is far below the 1 s read timeout, the whole answer would take ~5 s
    answer = "x" * 120
    for drip_headers in (False, True):
        with ScriptedOpenAIServer([Reply(content=answer, drip=0.02, drip_headers=drip_headers)]) as srv:
            backend = backend_for(srv.url, timeout=1.0, request_timeout=0.5, max_retries=0)
            start = time.monotonic()
            with pytest.raises(LLMBackendError, match="longer than request_timeout=0.5s"):
                backend.complete(HI)
            elapsed = time.monotonic() - start
            full = len(answer) + 200  # the chat-completion JSON around the answer, and the headers
            assert srv.sent[0] < full / 2  # stopped early: the server had sent less than half
        assert elapsed < 2.5  # generous bound: the full drip takes over 5 s


def test_oversized_answer_is_cut_at_max_response_bytes():
    cap = 256 * 1024
    with ScriptedOpenAIServer([Reply(stream_bytes=200 * 1024 * 1024)]) as srv:  # 200 MiB, no Content-Length
        backend = backend_for(srv.url, max_response_bytes=cap, max_retries=2)
        with pytest.raises(LLMBackendError, match=f"more than max_response_bytes={cap}") as info:
            backend.complete(HI)
        read = int(str(info.value).split("stopped reading at ")[1].split(")")[0])
        assert cap < read <= cap + 64 * 1024  # one chunk past the cap, no more
        assert len(srv.requests) == 1  # not retried: the same request gets the same answer
    with ScriptedOpenAIServer([Reply(stream_bytes=10 * 1024 * 1024, declare_length=True)]) as srv:
        backend = backend_for(srv.url, max_response_bytes=cap)
        with pytest.raises(LLMBackendError, match="announced a 10485760-byte answer"):
            backend.complete(HI)


def test_dead_server_opens_the_circuit_and_the_episode_falls_back():
    with ScriptedOpenAIServer([], default=Reply(hangup=True)) as srv:
        backend = backend_for(srv.url, max_retries=1)
        agent = LLMAgent(backend, agent={"circuit_breaker": 2})
        summary = agent.run_iterative_episode(FakeIterativeEnv(target=0.5))
        assert len(srv.requests) == 4  # 2 decisions x (1 + 1 retry); none after the circuit opened
    assert summary["terminated"] and summary["iterations"] > 2
    assert summary["fallbacks"] == summary["iterations"] and summary["backend_failures"] == 2
    assert summary["circuit_open"] is True and summary["circuit_opened_at"] == 2


def test_refused_connection_opens_the_circuit():
    backend = backend_for(f"http://127.0.0.1:{closed_port()}/v1", max_retries=0)
    summary = LLMAgent(backend, agent={"circuit_breaker": 3}).run_iterative_episode(FakeIterativeEnv(target=0.5))
    assert summary["terminated"] and summary["backend_failures"] == 3 and summary["circuit_opened_at"] == 3
    assert "Connection refused" in backend.last_request["errors"][0]


SECRET = "sk-test-do-not-leak-0123456789"


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_to_another_origin_never_receives_the_key(status):
    with ScriptedOpenAIServer(["the other origin's answer"]) as other:
        other_port = other.port
        with ScriptedOpenAIServer([redirect(other.url + "/chat/completions", status)]) as srv:
            backend = backend_for(srv.url, api_key=SECRET, max_retries=2)
            with pytest.raises(LLMBackendError) as info:
                backend.complete(HI)
            assert len(srv.requests) == 1  # refused, not retried: the same request gets the same redirect
            assert srv.requests[0]["headers"]["Authorization"] == f"Bearer {SECRET}"  # base_url's own origin
        assert other.requests == []  # nothing at all reached the other port
    message = str(info.value)
    assert f"HTTP {status}" in message and "another origin (http://127.0.0.1:" in message
    assert f":{other_port})" in message and "set base_url" in message and SECRET not in message


def test_same_origin_redirect_is_followed_with_the_same_post_and_bounded():
    with ScriptedOpenAIServer() as srv:
        srv.script += [redirect(srv.url.replace("/v1", "/v2") + "/chat/completions", 307), "moved answer"]
        backend = backend_for(srv.url, api_key=SECRET)
        assert backend.complete(HI) == "moved answer"
        first, second = srv.requests
        assert second["path"] == "/v2/chat/completions" and second["method"] == "POST"
        assert second["body"] == first["body"] and second["body"]["messages"] == HI
        assert second["headers"]["Authorization"] == f"Bearer {SECRET}"
    with ScriptedOpenAIServer() as srv:  # a redirect loop ends after 3 redirects, at once
        srv.default = redirect(srv.url + "/chat/completions", 302)
        with pytest.raises(LLMBackendError, match="redirect"):
            backend_for(srv.url, max_retries=2).complete(HI)
        assert len(srv.requests) == 4


def test_the_key_is_read_from_the_named_variable_and_never_echoed(monkeypatch):
    monkeypatch.setenv("MY_LLM_KEY", SECRET)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-the-default-variable")
    echo = f'{{"error": {{"message": "bad key Bearer {SECRET}"}}}}'.encode()
    with ScriptedOpenAIServer([f"you sent {SECRET}", Reply(status=401, raw_body=echo)]) as srv:
        backend = backend_for(srv.url, api_key_env="MY_LLM_KEY")
        assert SECRET not in repr(backend) and SECRET not in repr(backend.config)
        assert backend.complete(HI) == "you sent ***"
        with pytest.raises(LLMBackendError) as info:
            backend.complete(HI)
        assert srv.requests[0]["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert "bad key Bearer ***" in str(info.value) and SECRET not in str(info.value)
    monkeypatch.delenv("MY_LLM_KEY")
    with ScriptedOpenAIServer(["ok"]) as srv:
        backend_for(srv.url, api_key_env="MY_LLM_KEY").complete(HI)
        assert "Authorization" not in srv.requests[0]["headers"]  # an unset variable: no key, no fallback


@pytest.mark.parametrize("url, named", [
    ("htp://127.0.0.1:8000/v1", "scheme 'htp'"), ("127.0.0.1:8000/v1", "not http or https"),
    ("http:///v1", "no valid host"), ("http://127.0.0.1:99999/v1", "no valid host"),
    ("http://127.0.0.1:8000/v1?key=1", "query"), ("", "is not a URL"),
])
def test_bad_base_url_is_refused_when_the_config_is_built(url, named):
    with pytest.raises(ValueError) as info:
        HTTPBackendConfig(base_url=url, model="m")
    assert named in str(info.value) and "\n" not in str(info.value) and "http://127.0.0.1:8000/v1" in str(info.value)
    with pytest.raises(ValueError, match="holds credentials") as info:
        HTTPBackendConfig(base_url=f"http://user:{SECRET}@127.0.0.1:8000/v1", model="m")
    assert SECRET not in str(info.value)
    with pytest.raises(ValueError, match="api_key_env"):
        HTTPBackendConfig(api_key_env="MY KEY")
