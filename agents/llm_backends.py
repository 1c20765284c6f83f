"""Chat backends for the LLM pruning agent.

Two implementations of the :class:`ChatBackend` protocol:

* :class:`OpenAIChatBackend`: any OpenAI-compatible ``/chat/completions`` endpoint (OpenAI,
  vLLM, llama.cpp server, Ollama, LM Studio, ...). Stdlib ``urllib`` only, with retries and
  exponential backoff on timeouts, connection errors, 429 and 5xx.
* :class:`LocalChatBackend`: a local transformers chat model (default SmolLM2-135M-Instruct,
  GGUF). A model this small cannot be trusted to write valid JSON, so besides free-form
  :meth:`LocalChatBackend.complete` it offers :meth:`LocalChatBackend.choose`: constrained
  decoding by candidate scoring (summed log-likelihood of each candidate answer under the
  chat prompt), which always yields one of the given (valid) answers.

A backend that has a callable ``choose`` is driven by the agent in candidate-scoring mode.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Protocol, runtime_checkable

log = logging.getLogger(__name__)

__all__ = [
    "ChatBackend",
    "LLMBackendError",
    "OpenAIChatBackend",
    "LocalChatBackend",
    "DEFAULT_BASE_URL",
    "SMOLLM2_ALIAS",
]

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
SMOLLM2_ALIAS = "smollm2-135m"


class LLMBackendError(RuntimeError):
    """The backend could not produce an answer (after its retries)."""


@runtime_checkable
class ChatBackend(Protocol):
    """What the agent needs from a chat model.

    ``name`` is the model id written into result records. Optionally a backend also offers
    ``choose(messages, candidates: list[str]) -> int`` (index of the best candidate answer);
    the agent then uses candidate scoring instead of free-form JSON.
    """

    name: str

    def complete(self, messages: list[dict], *, schema_hint: str | None = None) -> str: ...


# --------------------------------------------------------------------------------------
# OpenAI-compatible HTTP backend
# --------------------------------------------------------------------------------------

_LOOPBACK = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}


class OpenAIChatBackend:
    """POST ``{base_url}/chat/completions`` with the standard body.

    Defaults: ``base_url`` from ``OPENAI_BASE_URL`` (else ``http://127.0.0.1:8000/v1``),
    ``model`` from ``OPENAI_MODEL`` then ``PRUNE_GYM_LLM_MODEL``, ``api_key`` from
    ``OPENAI_API_KEY`` (sent as ``Authorization: Bearer``; optional for local servers).

    ``max_retries`` is the number of retries after the first attempt; the wait before retry
    ``i`` (0-based) is ``backoff * 2**i`` seconds (or the server's ``Retry-After``, capped at
    60 s). Timeouts, connection errors, 429 and 5xx are retried; other HTTP errors fail at once.
    ``json_mode=True`` sends ``response_format={"type": "json_object"}`` when the caller passes
    a ``schema_hint``; if the server rejects it with a 400 the request is repeated once without.
    """

    def __init__(
        self,
        base_url: str | None = None,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = 30.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        temperature: float = 0.0,
        *,
        json_mode: bool = False,
        max_tokens: int | None = None,
        seed: int | None = None,
        extra_body: dict | None = None,
    ) -> None:
        base_url = base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.model = model or os.environ.get("OPENAI_MODEL") or os.environ.get("PRUNE_GYM_LLM_MODEL")
        if not self.model:
            raise ValueError(
                "OpenAIChatBackend needs a model id: pass model=..., or set OPENAI_MODEL "
                "(or PRUNE_GYM_LLM_MODEL). Local servers (llama.cpp, vLLM) accept the name they serve."
            )
        self.name = str(self.model)
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.temperature = float(temperature)
        self.json_mode = bool(json_mode)
        self.max_tokens = max_tokens
        self.seed = seed
        self.extra_body = dict(extra_body or {})
        self.last_usage: dict | None = None
        self.last_response_model: str | None = None
        self.request_log: list[dict] = []  # per call: attempts and their errors (for transcripts)
        host = urllib.parse.urlsplit(self.base_url).hostname or ""
        handlers = [urllib.request.ProxyHandler({})] if host in _LOOPBACK else []
        self._opener = urllib.request.build_opener(*handlers)

    def __repr__(self) -> str:
        return f"OpenAIChatBackend(url={self.url!r}, model={self.model!r})"

    # -- request plumbing ------------------------------------------------------------
    def _body(self, messages: list[dict], use_json: bool) -> dict:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
            "temperature": self.temperature,
        }
        if use_json:
            body["response_format"] = {"type": "json_object"}
        if self.max_tokens is not None:
            body["max_tokens"] = int(self.max_tokens)
        if self.seed is not None:
            body["seed"] = int(self.seed)
        body.update(self.extra_body)
        return body

    def _post(self, body: dict) -> dict:
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        with self._opener.open(req, timeout=self.timeout) as resp:
            raw = resp.read()
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LLMBackendError(
                f"{self.url} returned a non-JSON body ({exc}): {raw[:200]!r}. "
                "Check that base_url points at an OpenAI-compatible API (it usually ends in /v1)."
            ) from None

    def _fail(self, last_error: str, attempts: int) -> LLMBackendError:
        return LLMBackendError(
            f"LLM request to {self.url} (model {self.model!r}) failed after {attempts} attempt(s); "
            f"last error: {last_error}. Fix: check that the server is running and reachable, and "
            f"that base_url (OPENAI_BASE_URL) is right, e.g. http://127.0.0.1:8000/v1; "
            f"or raise timeout/max_retries."
        )

    def complete(self, messages: list[dict], *, schema_hint: str | None = None) -> str:
        use_json = self.json_mode and schema_hint is not None
        attempts = 0
        errors: list[str] = []
        last_error = "none"
        total = self.max_retries + 1
        i = 0
        while i < total:
            attempts += 1
            retry_after: float | None = None
            try:
                payload = self._post(self._body(messages, use_json))
            except urllib.error.HTTPError as exc:
                detail = _read_error_body(exc)
                last_error = f"HTTP {exc.code} {exc.reason}{': ' + detail if detail else ''}"
                errors.append(last_error)
                if exc.code == 400 and use_json and "response_format" in detail.lower():
                    log.warning("%s rejected response_format; retrying without JSON mode", self.url)
                    use_json = False
                    continue  # does not consume a retry
                if exc.code == 429 or exc.code >= 500 or exc.code == 408:
                    retry_after = _retry_after_seconds(exc)
                else:
                    self.request_log.append({"attempts": attempts, "errors": errors})
                    raise LLMBackendError(
                        f"LLM request to {self.url} (model {self.model!r}) was refused: {last_error}. "
                        "Fix: check the model name, the API key (OPENAI_API_KEY) and base_url."
                    ) from None
            except (TimeoutError, socket.timeout) as exc:
                last_error = f"timeout after {self.timeout:g}s ({exc or 'timed out'})"
                errors.append(last_error)
            except urllib.error.URLError as exc:
                reason = exc.reason
                if isinstance(reason, (TimeoutError, socket.timeout)):
                    last_error = f"timeout after {self.timeout:g}s"
                else:
                    last_error = f"connection error: {reason}"
                errors.append(last_error)
            except (ConnectionError, OSError) as exc:  # reset / broken pipe / http.client errors
                last_error = f"connection error: {exc!r}"
                errors.append(last_error)
            except Exception as exc:  # http.client.RemoteDisconnected etc. are OSErrors; be safe
                if isinstance(exc, LLMBackendError):
                    self.request_log.append({"attempts": attempts, "errors": errors + [str(exc)]})
                    raise
                last_error = f"{type(exc).__name__}: {exc}"
                errors.append(last_error)
            else:
                content = _content_from(payload)
                if content is None:
                    self.request_log.append({"attempts": attempts, "errors": errors})
                    raise LLMBackendError(
                        f"{self.url} answered without choices[0].message.content: "
                        f"{json.dumps(payload)[:300]}. Fix: check that base_url is an "
                        "OpenAI-compatible chat endpoint."
                    )
                self.last_usage = payload.get("usage") if isinstance(payload, dict) else None
                self.last_response_model = payload.get("model") if isinstance(payload, dict) else None
                self.request_log.append({"attempts": attempts, "errors": errors})
                return content
            i += 1
            if i < total:
                wait = self.backoff * (2 ** (i - 1))
                if retry_after is not None:
                    wait = max(wait, min(retry_after, 60.0))
                log.warning("LLM request to %s failed (%s); retry %d/%d in %.2fs",
                            self.url, last_error, i, self.max_retries, wait)
                time.sleep(max(wait, 0.0))
        self.request_log.append({"attempts": attempts, "errors": errors})
        raise self._fail(last_error, attempts)


def _read_error_body(exc: urllib.error.HTTPError) -> str:
    try:
        text = exc.read().decode("utf-8", "replace")
    except Exception:
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
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        return None


def _content_from(payload: Any) -> str | None:
    try:
        message = payload["choices"][0]["message"]
    except (KeyError, IndexError, TypeError):
        return None
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if content is None:
        return None
    return str(content)


# --------------------------------------------------------------------------------------
# Local transformers backend
# --------------------------------------------------------------------------------------


def _cache_kwarg(model) -> str:
    """Name of the KV-cache argument of ``model.forward`` (transformers >= 5.x: ``cache``)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


class LocalChatBackend:
    """A local transformers chat model.

    ``loaded=(model, tokenizer)`` reuses an already loaded pair (nothing is loaded then);
    otherwise the model is loaded lazily on first use through ``prune_env.models.load_model``
    (alias ``"smollm2-135m"`` = the SmolLM2 GGUF, a ``.gguf`` path, or a HF directory / id): a
    copy of its own, never the one being pruned.
    """

    def __init__(
        self,
        model: str = SMOLLM2_ALIAS,
        device: str = "cpu",
        dtype: str = "float32",
        max_new_tokens: int = 128,
        *,
        loaded: tuple[Any, Any] | None = None,
        name: str | None = None,
        length_normalize: bool = False,
    ) -> None:
        self.spec = model
        self.device = device
        self.dtype = dtype
        self.max_new_tokens = int(max_new_tokens)
        self.length_normalize = bool(length_normalize)
        self.name = name or str(model)
        self._model = None
        self._tok = None
        if loaded is not None:
            self._model, self._tok = loaded
            if name is None and model == SMOLLM2_ALIAS:
                cfg = getattr(self._model, "config", None)
                self.name = str(getattr(cfg, "_name_or_path", "") or model)
        self.last_scores: list[float] | None = None
        self.last_prompt_tokens: int | None = None

    def __repr__(self) -> str:
        return f"LocalChatBackend(model={self.spec!r}, device={self.device!r})"

    def _ensure(self):
        if self._model is None:
            from prune_env.models import load_model

            self._model, self._tok = load_model(self.spec, self.device, self.dtype)
        self._model.eval()
        return self._model, self._tok

    @property
    def model(self):
        return self._ensure()[0]

    @property
    def tokenizer(self):
        return self._ensure()[1]

    def _prompt_text(self, messages: list[dict]) -> str:
        tok = self._tok
        msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        text = "".join(f"{m['role']}: {m['content']}\n" for m in msgs)
        return text + "assistant: "

    def _encode(self, text: str) -> list[int]:
        ids = self._tok(text, add_special_tokens=False)["input_ids"]
        if ids and isinstance(ids[0], list):
            ids = ids[0]
        return [int(i) for i in ids]

    def _context_limit(self) -> int:
        cfg = getattr(self._model, "config", None)
        n = getattr(cfg, "max_position_embeddings", None)
        return int(n) if n else 2048

    def _end_ids(self) -> list[int]:
        eos = getattr(self._tok, "eos_token", None)
        return self._encode(eos) if eos else []

    def _prompt_ids(self, messages: list[dict], reserve: int) -> list[int]:
        ids = self._encode(self._prompt_text(messages))
        limit = self._context_limit() - reserve
        if len(ids) > limit:
            log.warning("prompt of %d tokens exceeds the context (%d); keeping the last %d",
                        len(ids), self._context_limit(), limit)
            ids = ids[-limit:]
        self.last_prompt_tokens = len(ids)
        return ids

    def complete(self, messages: list[dict], *, schema_hint: str | None = None) -> str:
        """Greedy generation (free-form; not guaranteed to be valid JSON)."""
        import torch

        model, tok = self._ensure()
        ids = self._prompt_ids(messages, reserve=self.max_new_tokens)
        dev = next(model.parameters()).device
        x = torch.tensor([ids], device=dev)
        pad = getattr(tok, "pad_token_id", None)
        eos = getattr(tok, "eos_token_id", None)
        with torch.inference_mode():
            out = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=pad if pad is not None else eos,
            )
        return tok.decode(out[0, len(ids):], skip_special_tokens=True)

    def score(self, messages: list[dict], candidates: list[str]) -> list[float]:
        """Summed log-likelihood of each candidate (plus the end-of-turn token) after the prompt.

        The prompt is run once; a copy of its KV cache is reused for every candidate.
        With ``length_normalize=True`` the mean per-token log-likelihood is returned instead.
        """
        import torch

        if not candidates:
            raise ValueError("score() needs at least one candidate")
        model, _ = self._ensure()
        end = self._end_ids()
        cand_ids = [self._encode(c) + end for c in candidates]
        longest = max(len(c) for c in cand_ids)
        prompt = self._prompt_ids(messages, reserve=longest)
        dev = next(model.parameters()).device
        scores: list[float] = []
        cache_kw = _cache_kwarg(model)
        with torch.inference_mode():
            p = torch.tensor([prompt], device=dev)
            try:  # only the last position's logits are needed for the prompt
                out = model(input_ids=p, use_cache=True, logits_to_keep=1)
            except TypeError:
                out = model(input_ids=p, use_cache=True)
            cache = getattr(out, "cache", None)
            if cache is None:
                cache = getattr(out, "past_key_values", None)
            last_logits = out.logits[0, -1].float()
            for ids in cand_ids:
                if not ids:
                    scores.append(0.0)
                    continue
                c = torch.tensor([ids], device=dev)
                logits = None
                if cache is not None:
                    try:  # reuse the prompt's KV cache (a copy: the forward extends it in place)
                        o = model(input_ids=c, use_cache=True, **{cache_kw: copy.deepcopy(cache)})
                        logits = torch.cat([last_logits[None], o.logits[0, :-1].float()], 0)
                    except Exception as exc:  # pragma: no cover - model without reusable cache
                        log.debug("KV-cache reuse failed (%s); scoring with full forwards", exc)
                        cache = None
                if logits is None:
                    o = model(input_ids=torch.cat([p, c], 1), use_cache=False)
                    logits = o.logits[0, len(prompt) - 1 : -1].float()
                lp = torch.log_softmax(logits, dim=-1).gather(1, c[0][:, None]).sum().item()
                scores.append(lp / len(ids) if self.length_normalize else lp)
        self.last_scores = scores
        return scores

    def choose(self, messages: list[dict], candidates: list[str]) -> int:
        """Index of the candidate answer the model finds most likely (ties: the first)."""
        scores = self.score(messages, candidates)
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        return best
