"""The LLM-prompted pruning agent (registry name "llm") and its chat backends.

Modules: `agent` (LLMAgent: the decision loop, iterative and one-shot), `options` (typed options), `prompts`, `parsing`
(JSON extraction, validation, repair), `memory` (self-reflection memory, bounded JSONL transcript),
`candidates` (zscore-greedy fallback, candidate moves for the local model), `chat` (the
ChatBackend interface, the local transformers model), `openai_http` (the bounded HTTP backend).
"""

from agents.llm.agent import LLMAgent
from agents.llm.options import AgentOptions, backend_config, build_backend
from agents.llm.chat import ChatBackend, LLMBackendError, LocalBackendConfig, LocalChatBackend
from agents.llm.openai_http import HTTPBackendConfig, OpenAIChatBackend

__all__ = ["AgentOptions", "ChatBackend", "HTTPBackendConfig", "LLMAgent", "LLMBackendError", "LocalBackendConfig",
           "LocalChatBackend", "OpenAIChatBackend", "backend_config", "build_backend"]
