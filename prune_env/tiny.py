"""Tiny randomly initialised models of each supported family: for unit tests and smoke runs only.

Never report a number measured on these; they exist so that tests run in seconds on 2 CPU cores.
"""

from __future__ import annotations

import functools

import torch

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma3", "gpt2", "opt")
_TOKENIZER_TEXT = (
    "The capital of France is Paris. The capital of Spain is Madrid. The chemical symbol for gold is Au. "
    "Debian is a free operating system; the package manager installs software from repositories. "
    "A country in the continent of Europe, Asia, Africa or America has an official currency such as the euro. "
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()-\n"
)


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in milliseconds on a fixed text (deterministic, offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([_TOKENIZER_TEXT] * 4, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<eos>")
    wrapped.name_or_path = "tiny-bpe"
    return wrapped


def _config(family: str, vocab_size: int):
    import transformers as tf

    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if family == "llama":
        return tf.LlamaConfig(**common)
    if family == "qwen2":
        return tf.Qwen2Config(**common)
    if family == "qwen3":
        return tf.Qwen3Config(**common, head_dim=8)
    if family == "mistral":
        return tf.MistralConfig(**common)
    if family == "gemma":
        return tf.GemmaConfig(**common, head_dim=8)
    if family == "gemma3":
        return tf.Gemma3TextConfig(**common, head_dim=8, sliding_window=16)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=3, n_head=4, n_positions=256)
    if family == "opt":
        return tf.OPTConfig(vocab_size=vocab_size, hidden_size=32, ffn_dim=64, num_hidden_layers=3,
                            num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=32)
    raise ValueError(f"unknown tiny family {family!r}: use one of {', '.join(FAMILIES)}")


def tiny_model(family: str = "llama", seed: int = 0):
    """(model, tokenizer) with random weights of the given family; float32, eval mode."""
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    config = _config(family, len(tokenizer))
    config.use_cache = False
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    return model, tokenizer
