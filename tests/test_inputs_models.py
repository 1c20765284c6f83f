"""Only causal decoders load: an encoder (BERT), an encoder-decoder (T5) or an unreadable config is
refused by name from its config.json, before any weight is read."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from prune_env.models import (
    SUPPORTED_FAMILIES,
    ModelSpecError,
    UnsupportedArchitectureError,
    check_causal_decoder,
    load_model,
)
from prune_env.tiny import FAMILIES, tiny_model


@pytest.fixture
def no_weight_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the model type was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def test_bert_folder_is_refused_before_its_weights_load(tmp_path: Path, no_weight_loading) -> None:
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32)
    transformers.BertForMaskedLM(config).save_pretrained(tmp_path)  # a real BERT checkpoint, weights included
    with pytest.raises(UnsupportedArchitectureError) as error:
        load_model(str(tmp_path))
    message = str(error.value)
    assert "'bert'" in message and str(tmp_path) in message
    for family in SUPPORTED_FAMILIES:
        assert family in message
    assert len(message) < 400 and "\n" not in message  # not transformers' list of ~300 config classes


def test_encoder_decoder_is_refused(tmp_path: Path, no_weight_loading) -> None:
    transformers.T5Config(d_model=16, num_layers=1, num_heads=2, d_ff=32, d_kv=8).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="model type 't5'"):
        load_model(str(tmp_path))


def test_unreadable_config_names_the_file(tmp_path: Path, no_weight_loading) -> None:
    (tmp_path / "config.json").write_bytes(b"\x89PNG\x00\xff\xfe garbage")
    with pytest.raises(ModelSpecError) as error:
        load_model(str(tmp_path))
    assert str(tmp_path / "config.json") in str(error.value)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_tiny_family_is_a_supported_decoder(family: str) -> None:
    model, _ = tiny_model(family)
    check_causal_decoder(model.config, f"tiny-{family}")  # raises if a family we test were refused


def test_unknown_device_is_refused() -> None:
    with pytest.raises(ValueError, match="device='tpu'"):
        load_model("tiny-llama", device="tpu")


def test_damaged_gguf_names_the_file(tmp_path: Path) -> None:
    damaged = tmp_path / "model.gguf"
    damaged.write_bytes(b"GGUF\x03\x00\x00\x00garbage")  # a truncated header
    with pytest.raises(ModelSpecError) as error:
        load_model(str(damaged))
    message = str(error.value)
    assert str(damaged) in message and "damaged" in message and "\n" not in message


def test_damaged_weights_name_the_folder(tmp_path: Path) -> None:
    model, tokenizer = tiny_model("llama")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x89PNG\x00\xff\xfe garbage")
    with pytest.raises(ModelSpecError, match=f"cannot load the model from '{tmp_path}'.*damaged"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_saved_decoder_folder_still_loads(tmp_path: Path, family: str) -> None:
    model, tokenizer = tiny_model(family)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, _ = load_model(str(tmp_path))
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
