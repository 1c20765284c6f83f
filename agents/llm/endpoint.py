"""Where the OpenAI-compatible backend may send its request and its API key.

`check_base_url` refuses what can only fail (a scheme other than http/https, no host, a port out of
range) or leak (credentials in the URL), before any work. `SameOriginRedirectHandler` lets urllib
follow a redirect only within the origin (scheme, host, port) of the request, re-sending the same POST
(a chat completion has no GET form); a redirect to another origin is refused before anything, the
Authorization header included, is sent there. `scrub` keeps the key out of the text the backend emits.
"""

from __future__ import annotations

import os
import re
import urllib.parse
import urllib.request
from typing import Any

from agents.llm.chat import LLMBackendError
from prune_env.config_files import ConfigError

__all__ = ["DEFAULT_BASE_URL", "REDACTED", "SameOriginRedirectHandler", "check_base_url", "check_env_name",
           "resolve_endpoint", "scrub"]

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
REDACTED = "***"
MAX_REDIRECTS = 3
_MIN_SCRUBBED_KEY = 8  # shorter keys are not searched for in answers (they would mangle ordinary text)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_env_name(name: str, value: Any) -> str:
    """`value` if it can name an environment variable."""
    if not isinstance(value, str) or not _ENV_NAME.fullmatch(value):
        raise ConfigError(f"{name}={value!r} is not an environment variable name: give one such as OPENAI_API_KEY")
    return value


def check_base_url(url: Any, name: str = "base_url") -> str:
    """`url` if it is an http(s) URL with a host and nothing that cannot be a base (checked before any work:
    'htp://...' would otherwise make every request fail and every move fall back)."""
    example = "e.g. http://127.0.0.1:8000/v1 or https://api.openai.com/v1"
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(f"{name}={url!r} is not a URL: give the server's OpenAI-compatible API, {example}")
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme.lower() not in ("http", "https"):
        raise ConfigError(f"{name}={url!r} has scheme {parts.scheme!r}, not http or https: {example}")
    if parts.username is not None or parts.password is not None:  # not echoed: the URL holds a secret
        raise ConfigError(f"{name} holds credentials (user:password@host): remove them from the URL and put the "
                          "key in the environment variable named by api_key_env (OPENAI_API_KEY)")
    try:
        valid_port = parts.port is not None or ":" not in parts.netloc.rpartition("]")[2]
    except ValueError:  # a port that is no number in 0-65535
        valid_port = False
    if not parts.hostname or not valid_port:
        raise ConfigError(f"{name}={url!r} has no valid host[:port]: {example}")
    if parts.query or parts.fragment:
        raise ConfigError(f"{name}={url!r} has a query or fragment: give the API base only, {example}")
    return url


def resolve_endpoint(base_url: str | None, model: str | None) -> tuple[str, str]:
    """(base_url, model), the environment filling what the config leaves out; ConfigError when the model
    is missing or $OPENAI_BASE_URL is no http(s) URL (the benchmark calls this before any work)."""
    if not base_url and os.environ.get("OPENAI_BASE_URL"):
        base_url = check_base_url(os.environ["OPENAI_BASE_URL"], "OPENAI_BASE_URL")
    base_url = base_url or DEFAULT_BASE_URL
    model = model or os.environ.get("OPENAI_MODEL") or os.environ.get("PRUNE_GYM_LLM_MODEL")
    if not model:
        raise ConfigError("the openai llm backend needs a model id: set backend.model, or OPENAI_MODEL (or "
                          "PRUNE_GYM_LLM_MODEL); local servers (llama.cpp, vLLM) accept the name they serve")
    return base_url.strip().rstrip("/"), str(model)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = -1
    return scheme, (parts.hostname or "").lower(), port or {"http": 80, "https": 443}.get(scheme)


def _origin_text(url: str) -> str:
    scheme, host, port = _origin(url)
    return f"{scheme}://{host}:{port}"


class SameOriginRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only within the origin of the request (re-sending the same POST); a redirect to
    another origin raises LLMBackendError before anything, the API key included, is sent there."""

    max_redirections = max_repeats = MAX_REDIRECTS

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if _origin(newurl) != _origin(req.full_url):
            fp.close()
            raise LLMBackendError(
                f"{req.full_url} answered HTTP {code} redirecting to another origin ({_origin_text(newurl)}); "
                "the request and its API key were not sent there. Fix: if that server is the API you mean, "
                "set base_url to it (with https:// where the redirect goes to https)")
        return urllib.request.Request(newurl, data=req.data, headers=dict(req.header_items()),
                                      origin_req_host=req.origin_req_host, unverifiable=True,
                                      method=req.get_method())


def scrub(text: str, key: str | None) -> str:
    """`text` with `key` replaced by "***" (a server may echo the Authorization header back)."""
    return text.replace(key, REDACTED) if key and len(key) >= _MIN_SCRUBBED_KEY else text
