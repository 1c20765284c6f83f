"""Tiny randomly initialised models of each supported family: for unit tests and smoke runs only.

Never report a number measured on these; they exist so that tests run in seconds on 2 CPU cores.
A name is a family (`llama` -> 3 decoder blocks) or a family and a depth (`llama-5` -> 5 blocks), so
tests can check that a policy moves between models of different depths (model spec `tiny-llama-5`).
"""

from __future__ import annotations

import functools

import torch

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma3", "gpt2", "opt")
DEFAULT_BLOCKS = 3
MAX_BLOCKS = 64
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


def parse_tiny_name(name: str) -> tuple[str, int]:
    """(family, number of decoder blocks) of a tiny model name: `llama` -> (llama, 3), `llama-5` -> (llama, 5)."""
    family, dash, depth = name.rpartition("-")
    if not dash or not depth.isdigit():
        family, depth = name, str(DEFAULT_BLOCKS)
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family in {name!r}: use a family ({', '.join(FAMILIES)}), optionally with "
                         f"a depth, e.g. 'llama' (3 blocks) or 'llama-5' (5 blocks)")
    blocks = int(depth)
    if not 1 <= blocks <= MAX_BLOCKS:
        raise ValueError(f"tiny model {name!r} asks for {blocks} decoder blocks: use 1 to {MAX_BLOCKS}, "
                         f"e.g. '{family}-5'")
    return family, blocks


def _config(family: str, blocks: int, vocab_size: int):
    import transformers as tf

    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=blocks,
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
        return tf.GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=blocks, n_head=4, n_positions=256)
    if family == "opt":
        return tf.OPTConfig(vocab_size=vocab_size, hidden_size=32, ffn_dim=64, num_hidden_layers=blocks,
                            num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=32)
    raise AssertionError(f"parse_tiny_name accepted an unknown family {family!r}")  # FAMILIES lists every branch


def tiny_model(family: str = "llama", seed: int = 0):
    """(model, tokenizer) with random weights of the given family (`llama`, or `llama-5` for 5 blocks); float32,
    eval mode. The same name and seed give the same weights."""
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    config = _config(*parse_tiny_name(family), len(tokenizer))
    config.use_cache = False
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    return model, tokenizer
