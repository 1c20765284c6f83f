"""The OpenAI-compatible HTTP chat backend (OpenAI, vLLM, llama.cpp server, Ollama, LM Studio, ...).

Stdlib `urllib` only. A served model is someone else's process, so every request is bounded:

* bytes: the body is read in chunks and the request fails once it passes `max_response_bytes`
  (a declared Content-Length above the cap fails before any read);
* time: `timeout` bounds each connect and socket read, `request_timeout` the whole request; a
  watchdog shuts the socket down at that deadline, so a server trickling bytes just under the read
  timeout (headers or body) cannot hold a call longer than `request_timeout`;
* transient failures are retried with exponential backoff (`backoff * 2**i`, capped at
  `max_backoff`; a longer `Retry-After` is honoured up to the cap): timeouts, connection errors, 408,
  429, 5xx, and empty, truncated or non-JSON bodies. Other 4xx, an oversized body and a JSON body
  without `choices[0].message.content` fail at once (retrying would get the same answer).

One `complete` therefore lasts at most about `(max_retries + 1) * request_timeout` plus the waits.

The API key goes only to the origin (scheme, host, port) of `base_url` (agents/llm/endpoint.py): a
redirect to the same origin is followed (at most 3, method and body kept), a redirect to any other
origin is refused before anything is sent there (following it would hand the key to that server, and
its answer is not an answer of the configured API). The key is read from `api_key_env` ($OPENAI_API_KEY)
unless `api_key` is set, is never part of a repr, and is replaced by "***" in every error, answer and log
line this backend emits.
"""

from __future__ import annotations

import functools
import http.client
import json
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from agents.llm.chat import ChatBackend, LLMBackendError
from agents.llm.endpoint import (DEFAULT_BASE_URL, SameOriginRedirectHandler, check_base_url, check_env_name,
                                 resolve_endpoint, scrub)
from prune_env.validation import check_number

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_BASE_URL", "HTTPBackendConfig", "OpenAIChatBackend"]

_LOOPBACK = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}
_CHUNK = 64 * 1024
_ERROR_BODY_BYTES = 4096


@dataclass
class HTTPBackendConfig:
    """Options of `OpenAIChatBackend` (the `backend:` mapping of an llm agent with `type: openai`).

    base_url and model default to $OPENAI_BASE_URL (else http://127.0.0.1:8000/v1), $OPENAI_MODEL then
    $PRUNE_GYM_LLM_MODEL. The key (a Bearer token; optional for local servers) is read from the environment
    variable `api_key_env` (default OPENAI_API_KEY); a literal `api_key` overrides it and is never written
    out (benchmark results store "***").
    `json_mode` sends response_format=json_object when the agent asks for JSON (dropped once if the
    server rejects it with a 400). `extra_body` is merged into every request body.
    """

    base_url: str | None = None
    model: str | None = None
    api_key: str | None = field(default=None, repr=False)
    api_key_env: str = "OPENAI_API_KEY"
    timeout: float = 30.0
    request_timeout: float = 120.0
    max_response_bytes: int = 1024 * 1024
    max_retries: int = 3
    backoff: float = 1.0
    max_backoff: float = 60.0
    temperature: float = 0.0
    json_mode: bool = False
    max_tokens: int | None = None
    seed: int | None = None
    extra_body: dict | None = None

    def __post_init__(self) -> None:
        if self.base_url is not None:
            check_base_url(self.base_url, "base_url")
        check_env_name("api_key_env", self.api_key_env)
        check_number("timeout", self.timeout, low=0.0, low_open=True)
        check_number("request_timeout", self.request_timeout, low=0.0, low_open=True)
        check_number("max_response_bytes", self.max_response_bytes, low=1, integer=True)
        check_number("max_retries", self.max_retries, low=0, integer=True)
        check_number("backoff", self.backoff, low=0.0)
        check_number("max_backoff", self.max_backoff, low=0.0)
        check_number("temperature", self.temperature, low=0.0)
        if self.max_tokens is not None:
            check_number("max_tokens", self.max_tokens, low=1, integer=True)
        if self.seed is not None:
            check_number("seed", self.seed, integer=True)


class _Deadline:
    """The wall-clock budget of one request: at its end every socket it watches is shut down, which
    wakes a read blocked in the middle of a slow drip."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shutdown(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shutdown(sock)

    def cancel(self) -> None:
        self._timer.cancel()


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed
        pass


class _WatchedConnection:
    """Mixin for http.client connections: the connect timeout is what is left of the request's deadline,
    and the socket is watched so a slow drip cannot outlast it."""

    def __init__(self, *args, deadline: _Deadline, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.deadline = deadline

    def connect(self) -> None:
        self.timeout = max(min(self.timeout, self.deadline.remaining()), 0.001)
        super().connect()
        self.deadline.watch(self.sock)


class _WatchedHTTPConnection(_WatchedConnection, http.client.HTTPConnection):
    pass


class _WatchedHTTPSConnection(_WatchedConnection, http.client.HTTPSConnection):
    pass


class _WatchedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self.deadline = deadline

    def http_open(self, req):
        return self.do_open(functools.partial(_WatchedHTTPConnection, deadline=self.deadline), req)


class _WatchedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self.deadline = deadline

    def https_open(self, req):
        return self.do_open(functools.partial(_WatchedHTTPSConnection, deadline=self.deadline), req)


class _Retriable(Exception):
    """A failed attempt worth repeating (the message is the error recorded)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class OpenAIChatBackend(ChatBackend):
    """POST `{base_url}/chat/completions` with the standard body; see the module docstring for the limits.

    `last_request` after each `complete`: attempts, the error of each failed attempt, response bytes.
    """

    def __init__(self, config: HTTPBackendConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or HTTPBackendConfig()
        self.base_url, self.model = resolve_endpoint(config.base_url, config.model)
        self.url = self.base_url + "/chat/completions"
        self.name = self.model
        self._api_key = config.api_key if config.api_key is not None else os.environ.get(config.api_key_env)
        self._use_env_proxy = (urllib.parse.urlsplit(self.base_url).hostname or "") not in _LOOPBACK
        self.last_usage: dict | None = None

    def __repr__(self) -> str:
        return f"OpenAIChatBackend(url={self.url!r}, model={self.model!r})"

    def _scrub(self, text: str) -> str:
        return scrub(text, self._api_key)

    def _body(self, messages: list[dict], use_json: bool) -> dict:
        body: dict[str, Any] = {"model": self.model, "temperature": self.config.temperature,
                                "messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
        if use_json:
            body["response_format"] = {"type": "json_object"}
        if self.config.max_tokens is not None:
            body["max_tokens"] = int(self.config.max_tokens)
        if self.config.seed is not None:
            body["seed"] = int(self.config.seed)
        body.update(self.config.extra_body or {})
        return body

    def _post(self, body: dict) -> tuple[dict, int]:
        """One HTTP attempt: (parsed JSON body, bytes read). Raises HTTPError, _Retriable or LLMBackendError."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        req = urllib.request.Request(self.url, data=json.dumps(body).encode("utf-8"), headers=headers,
                                     method="POST")
        deadline = _Deadline(self.config.request_timeout)
        handlers: list = [_WatchedHTTPHandler(deadline), _WatchedHTTPSHandler(deadline), SameOriginRedirectHandler()]
        if not self._use_env_proxy:
            handlers.append(urllib.request.ProxyHandler({}))
        try:
            with urllib.request.build_opener(*handlers).open(req, timeout=self.config.timeout) as resp:
                raw = self._read_body(resp, deadline)
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            if isinstance(exc, urllib.error.HTTPError):
                raise
            if deadline.expired:
                raise _Retriable(self._deadline_message()) from None
            raise
        finally:
            deadline.cancel()
        if not raw.strip():
            raise _Retriable("empty response body")
        try:
            return json.loads(raw.decode("utf-8")), len(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _Retriable(f"non-JSON response body ({exc}): {raw[:200]!r}; check that base_url points at "
                             "an OpenAI-compatible API (it usually ends in /v1)") from None

    def _deadline_message(self) -> str:
        return f"request took longer than request_timeout={self.config.request_timeout:g}s"

    def _read_body(self, resp, deadline: _Deadline) -> bytes:
        cap = self.config.max_response_bytes
        declared = resp.headers.get("Content-Length")
        if declared is not None and declared.strip().isdigit() and int(declared) > cap:
            raise LLMBackendError(f"{self.url} announced a {int(declared)}-byte answer, more than "
                                  f"max_response_bytes={cap}; raise max_response_bytes or lower max_tokens")
        chunks: list[bytes] = []
        size = 0
        while True:
            if deadline.expired or deadline.remaining() <= 0:
                raise _Retriable(self._deadline_message())
            chunk = resp.read1(_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > cap:
                raise LLMBackendError(f"{self.url} sent more than max_response_bytes={cap} bytes (stopped "
                                      f"reading at {size}); raise max_response_bytes or lower max_tokens")
            chunks.append(chunk)
        if deadline.expired:
            raise _Retriable(self._deadline_message())
        if declared is not None and declared.strip().isdigit() and size < int(declared):
            raise _Retriable(f"truncated response body: {size} of {int(declared)} bytes")
        return b"".join(chunks)

    def _fail(self, last_error: str, attempts: int) -> LLMBackendError:
        return LLMBackendError(
            f"LLM request to {self.url} (model {self.model!r}) failed after {attempts} attempt(s); "
            f"last error: {last_error}. Fix: check that the server is running and reachable, and "
            f"that base_url (OPENAI_BASE_URL) is right, e.g. http://127.0.0.1:8000/v1; "
            f"or raise timeout/request_timeout/max_retries.")

    def complete(self, messages: list[dict], *, schema_hint: str | None = None) -> str:
        cfg = self.config
        use_json = cfg.json_mode and schema_hint is not None
        errors: list[str] = []
        self.last_request = record = {"attempts": 0, "errors": errors, "bytes": 0}
        retry = 0
        while True:
            record["attempts"] += 1
            retry_after: float | None = None
            try:
                payload, record["bytes"] = self._post(self._body(messages, use_json))
            except urllib.error.HTTPError as exc:
                detail = self._scrub(_read_error_body(exc))
                error = f"HTTP {exc.code} {exc.reason}{': ' + detail if detail else ''}"
                errors.append(error)
                if exc.code == 400 and use_json and "response_format" in detail.lower():
                    log.warning("%s rejected response_format; retrying without JSON mode", self.url)
                    use_json = False
                    continue  # does not consume a retry
                if not (exc.code in (408, 429) or exc.code >= 500):
                    raise LLMBackendError(
                        f"LLM request to {self.url} (model {self.model!r}) was refused: {error}. "
                        f"Fix: check the model name, the API key (api_key or ${cfg.api_key_env}) and base_url."
                    ) from None
                retry_after = _retry_after_seconds(exc)
            except _Retriable as exc:
                errors.append(self._scrub(str(exc)))
            except (TimeoutError, socket.timeout) as exc:
                errors.append(f"timeout after {cfg.timeout:g}s ({exc or 'timed out'})")
            except urllib.error.URLError as exc:
                timed_out = isinstance(exc.reason, (TimeoutError, socket.timeout))
                errors.append(f"timeout after {cfg.timeout:g}s" if timed_out else f"connection error: {exc.reason}")
            except (OSError, http.client.HTTPException) as exc:  # reset, broken pipe, bad status line
                errors.append(self._scrub(f"connection error: {exc!r}"))
            else:
                content = _content_from(payload)
                if content is None:
                    raise LLMBackendError(
                        f"{self.url} answered without choices[0].message.content: "
                        f"{self._scrub(json.dumps(payload))[:300]}. "
                        "Fix: check that base_url is an OpenAI-compatible chat endpoint.")
                self.last_usage = payload.get("usage") if isinstance(payload, dict) else None
                return self._scrub(content)
            if retry >= cfg.max_retries:
                raise self._fail(errors[-1], record["attempts"])
            wait = min(cfg.backoff * (2 ** retry), cfg.max_backoff)
            if retry_after is not None:
                wait = max(wait, min(retry_after, cfg.max_backoff))
            retry += 1
            log.warning("LLM request to %s failed (%s); retry %d/%d in %.2fs", self.url, errors[-1], retry,
                        cfg.max_retries, wait)
            time.sleep(wait)


def _read_error_body(exc: urllib.error.HTTPError) -> str:
    """The message of an error response, from at most its first 4 KiB."""
    try:
        text = exc.read(_ERROR_BODY_BYTES).decode("utf-8", "replace")
    except (OSError, http.client.HTTPException):
        return ""
    try:
        obj = json.loads(text)
        if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
            text = str(obj["error"].get("message", text))
        elif isinstance(obj, dict) and "error" in obj:
            text = str(obj["error"])
    except json.JSONDecodeError:
        pass
    return " ".join(text.split())[:300]


def _retry_after_seconds(exc: urllib.error.HTTPError) -> float | None:
    value = exc.headers.get("Retry-After") if exc.headers is not None else None
    try:
        return max(float(value), 0.0) if value else None
    except ValueError:  # an HTTP date: the exponential backoff applies
        return None


def _content_from(payload: Any) -> str | None:
    try:
        message = payload["choices"][0]["message"]
    except (KeyError, IndexError, TypeError):
        return None
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return None if content is None else str(content)
