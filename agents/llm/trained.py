"""The LLM agent after training in the env (registry name "llm-trained"): base model + LoRA adapter, offline.

It is the one-shot LLM agent with a fine-tuned local model: the same prompt (`allocation_messages`),
greedy generation of the JSON answer, the agent's parser, repairs, re-asks and z-score fallback, and the
same transcripts (`transcripts/<label>-t<target>-s<seed>.jsonl` with the prompt, the raw answer and the
allocation). The adapter folder (what `python train.py --config configs/llm-grpo.yaml` writes in
run_dir/adapter) holds adapter_model.safetensors, adapter_config.json and tuning.json (the base model);
it is read without unpickling, and a folder with pickled weights is refused.

    build_agent({"name": "llm-trained", "adapter": "docs/results/llm-trained/adapter"})
"""

from __future__ import annotations

from pathlib import Path

from agents.llm.agent import LLMAgent
from agents.llm.chat import ChatBackend, LocalBackendConfig, LocalChatBackend
from prune_env.config_files import ConfigError
from prune_env.validation import check_device

__all__ = ["TrainedLLMAgent", "load_adapter_model"]

PICKLED = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def check_adapter_folder(adapter: str | Path) -> Path:
    """The adapter folder, refused (one line) when it is missing, incomplete, or holds pickled files."""
    from training.grpo import TUNING_FILE

    folder = Path(adapter)
    missing = [name for name in ("adapter_config.json", "adapter_model.safetensors", TUNING_FILE)
               if not (folder / name).is_file()]
    if missing:
        raise ConfigError(f"adapter {str(folder)!r} lacks {missing}: give the adapter folder a GRPO run wrote "
                          "(run_dir/adapter)")
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLED)
    if pickled:
        raise ConfigError(f"adapter {str(folder)!r} holds pickled files {pickled}: only safetensors adapters are "
                          "loaded (unpickling can run code); remove them")
    return folder


def load_adapter_model(adapter: str | Path, model: str | None = None, device: str = "cpu", dtype: str = "float32"):
    """(merged model, tokenizer): the base model (tuning.json's, or `model`) with the adapter merged in."""
    from peft import PeftModel

    from training.grpo import read_tuning
    from prune_env.models import load_model

    folder = check_adapter_folder(adapter)
    base, tokenizer = load_model(model or read_tuning(folder)["base_model"], device, dtype)
    merged = PeftModel.from_pretrained(base, str(folder), is_trainable=False).merge_and_unload()
    merged.eval()
    return merged, tokenizer


class TrainedLLMAgent(LLMAgent):
    """One-shot allocations by the trained model (greedy, so deterministic); `model` overrides the base
    model named in tuning.json; `agent`: AgentOptions (use_candidates is always off: the model writes)."""

    name = "llm-trained"
    plays_env = False  # it reads the context's profile table like a heuristic and plays no env

    def __init__(self, adapter: str, model: str | None = None, device: str = "cpu", dtype: str = "float32",
                 max_new_tokens: int | None = None, agent: dict | None = None):
        from training.grpo import read_tuning

        folder = check_adapter_folder(adapter)  # before any model loads
        tuning = read_tuning(folder)
        self.adapter, self.base_model = folder, model or str(tuning["base_model"])
        self.device, self.dtype = check_device(device), dtype
        options = {**(agent or {}), "use_candidates": False}
        tokens = int(max_new_tokens or tuning.get("max_new_tokens", 512))
        super().__init__(backend={"type": "local", "model": self.base_model, "device": self.device, "dtype": dtype,
                                  "max_new_tokens": tokens, "name": f"{self.base_model}+{folder.name}"},
                         mode="oneshot", agent=options)
        self._loaded: LocalChatBackend | None = None

    def _backend(self) -> ChatBackend:
        """The merged model, loaded once per agent (later allocations reuse it)."""
        if self._loaded is None:
            config = self.backend_config
            assert isinstance(config, LocalBackendConfig)
            loaded = load_adapter_model(self.adapter, self.base_model, self.device, self.dtype)
            self._loaded = LocalChatBackend(config, loaded=loaded)
        return self._loaded
