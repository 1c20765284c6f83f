"""Chat backends: the interface the LLM agent talks to, and the local transformers model.

`ChatBackend` is the one backend interface (a concrete base class, so the agent never probes for
attributes): `name` (the model id written into result records), `complete(messages, schema_hint)`
(free-form answer), and for backends with `chooses = True`, `choose(messages, candidates)` (index of
the most likely candidate answer: the agent then builds valid moves and lets the model pick one).
`OpenAIChatBackend` (agents/llm/openai_http.py) serves models over HTTP.

`LocalChatBackend` runs a local transformers chat model (default SmolLM2-135M-Instruct, GGUF). A
model this small cannot be trusted to write valid JSON, so the agent uses its `choose`: constrained
decoding by candidate scoring (summed log-likelihood of each candidate answer under the chat
prompt), which always yields one of the given (valid) answers and picks deterministically.
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass
from typing import Any

from prune_env.validation import check_number

log = logging.getLogger(__name__)

__all__ = ["SMOLLM2_ALIAS", "ChatBackend", "LLMBackendError", "LocalBackendConfig", "LocalChatBackend"]

SMOLLM2_ALIAS = "smollm2-135m"


class LLMBackendError(RuntimeError):
    """The backend could not produce an answer (after its retries)."""


class ChatBackend:
    """What the agent needs from a chat model; subclass it and override `complete` (and `choose`).

    last_request   details of the last `complete` (attempts, errors of failed attempts), or None
    last_scores    the candidate scores of the last `choose`, or None
    """

    name: str = "chat-model"
    chooses: bool = False

    def __init__(self) -> None:
        self.last_request: dict | None = None
        self.last_scores: list[float] | None = None

    def complete(self, messages: list[dict], *, schema_hint: str | None = None) -> str:
        raise NotImplementedError(f"{type(self).__name__} must implement complete(messages, schema_hint=...)")

    def choose(self, messages: list[dict], candidates: list[str]) -> int:
        raise NotImplementedError(f"{type(self).__name__} has no candidate scoring (chooses = False)")


@dataclass
class LocalBackendConfig:
    """Options of `LocalChatBackend` (the `backend:` mapping of an llm agent with `type: local`).

    model: alias ("smollm2-135m"), .gguf path, HF directory or id, loaded through
    prune_env.models.load_model as a copy of its own (never the model being pruned).
    """

    model: str = SMOLLM2_ALIAS
    device: str = "cpu"
    dtype: str = "float32"
    max_new_tokens: int = 128
    name: str | None = None
    length_normalize: bool = False

    def __post_init__(self) -> None:
        check_number("max_new_tokens", self.max_new_tokens, low=1, integer=True)


def _cache_kwarg(model) -> str:
    """Name of the KV-cache argument of ``model.forward`` (transformers >= 5.x: ``cache``)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


class LocalChatBackend(ChatBackend):
    """A local transformers chat model, driven by candidate scoring (`choose`).

    ``loaded=(model, tokenizer)`` reuses an already loaded pair (nothing is loaded then);
    otherwise the model is loaded lazily on first use through ``prune_env.models.load_model``
    (alias ``"smollm2-135m"`` = the SmolLM2 GGUF, a ``.gguf`` path, or a HF directory / id): a
    copy of its own, never the one being pruned.
    """

    chooses = True

    def __init__(self, config: LocalBackendConfig | None = None, *, loaded: tuple[Any, Any] | None = None) -> None:
        super().__init__()
        config = config or LocalBackendConfig()
        self.spec, self.device, self.dtype = config.model, config.device, config.dtype
        self.max_new_tokens = int(config.max_new_tokens)
        self.length_normalize = bool(config.length_normalize)
        self.name = config.name or str(config.model)
        self._model = None
        self._tok = None
        if loaded is not None:
            self._model, self._tok = loaded
            if config.name is None and config.model == SMOLLM2_ALIAS:
                cfg = getattr(self._model, "config", None)
                self.name = str(getattr(cfg, "_name_or_path", "") or config.model)
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
