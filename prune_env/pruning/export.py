"""Writing a pruned model the Hugging Face way: `save_pretrained` (safetensors) plus its masks."""

from __future__ import annotations

from pathlib import Path

import torch

from ..context import PruningContext


def save_plain_pretrained(model, directory: str | Path) -> None:
    """model.save_pretrained as a plain float checkpoint.

    A model loaded from a GGUF file carries a GGUF 'quantizer' although its weights were dequantized
    at load time, and transformers refuses to save it; the quantizer and the config's
    quantization_config are detached for the save and put back after.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    had_qc = hasattr(model.config, "quantization_config")
    qc = getattr(model.config, "quantization_config", None)
    try:
        if quantizer is not None:
            model.hf_quantizer = None
        if had_qc:
            del model.config.quantization_config
        model.save_pretrained(directory)
    finally:
        if quantizer is not None:
            model.hf_quantizer = quantizer
        if had_qc:
            model.config.quantization_config = qc


def save_masks(ctx: PruningContext, path: str | Path) -> None:
    """Keep-masks (1 = kept) of every pruned linear, by module name; re-apply them after fine-tuning."""
    from safetensors.torch import save_file

    save_file({name: keep.to(torch.uint8).contiguous().cpu() for name, keep in ctx.masked.masks.items()}, str(path))


def save_pruned(ctx: PruningContext, directory: str | Path, save_model: bool = True) -> None:
    """masks.safetensors, and model/ (weights + tokenizer) unless save_model is False."""
    directory = Path(directory)
    save_masks(ctx, directory / "masks.safetensors")
    if save_model:
        save_plain_pretrained(ctx.model, directory / "model")
        ctx.tokenizer.save_pretrained(directory / "model")
