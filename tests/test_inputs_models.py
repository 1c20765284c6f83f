"""Only causal decoders load: an encoder (BERT), an encoder-decoder (T5), a model with its own Python
(`auto_map`) or an unreadable config is refused by name from its config.json, before any weight is read;
the header (config or GGUF metadata) answers the size questions before loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from prune_env.models import (
    SUPPORTED_FAMILIES,
    ModelSpecError,
    UnsupportedArchitectureError,
    check_causal_decoder,
    check_memory,
    linear_layers,
    load_model,
    load_tokenizer,
    read_header,
)
from prune_env.tiny import FAMILIES, tiny_model

ROOT = Path(__file__).resolve().parents[1]


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
    with pytest.raises(ModelSpecError, match=f"cannot read the model config '{damaged}' .*intact"):
        read_header(str(damaged))  # a struct.error inside the GGUF reader, named like any other damage


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


# ----------------------------------------------------------------------------- no model's own code ever runs

PAYLOAD = "import pathlib\npathlib.Path({marker!r}).write_text('the folder code ran')\n"


def _payload_folder(folder: Path, marker: Path) -> Path:
    """A folder whose config class is the folder's own Python: importing it writes `marker`."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "payload", "auto_map": {"AutoConfig": "configuration_payload.PayloadConfig",
                                              "AutoModelForCausalLM": "configuration_payload.PayloadConfig"}}))
    (folder / "configuration_payload.py").write_text(
        PAYLOAD.format(marker=str(marker)) + "from transformers import PretrainedConfig\n\n\n"
        "class PayloadConfig(PretrainedConfig):\n    model_type = 'payload'\n")
    return folder


def test_auto_map_folder_is_refused_without_a_prompt_and_its_code_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    folder = _payload_folder(tmp_path / "custom", marker)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "prune_env.cli", "--model", str(folder), "--out",
                           str(tmp_path / "out")], input="y\n", capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=env)  # "y" would answer transformers' "run custom code? [y/N]"
    assert done.returncode == 2, done.stderr[-2000:]
    assert "[y/N]" not in done.stdout + done.stderr
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert f"'{folder / 'config.json'}' has an 'auto_map' entry" in done.stderr
    assert not marker.exists()
    # the payload is real: a loader that trusted the folder would have run it
    transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=True)
    assert marker.read_text() == "the folder code ran"


def _saved_tiny(folder: Path, family: str = "llama") -> Path:
    model, tokenizer = tiny_model(family)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_custom_tokenizer_code_is_refused_too(tmp_path: Path, no_weight_loading) -> None:
    folder = _saved_tiny(tmp_path / "llama")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_custom.CustomTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    for load in (load_model, read_header, load_tokenizer):
        with pytest.raises(ModelSpecError, match=r"tokenizer_config.json' has an 'auto_map' entry"):
            load(str(folder))


def test_a_hub_config_with_auto_map_is_refused(monkeypatch: pytest.MonkeyPatch, no_weight_loading) -> None:
    config = transformers.LlamaConfig(auto_map={"AutoModelForCausalLM": "modeling_custom.CustomModel"})
    seen = []
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained",
                        staticmethod(lambda *args, **kwargs: seen.append(kwargs) or config))  # no network
    with pytest.raises(ModelSpecError, match="'owner/custom-model' needs its own Python code"):
        read_header("owner/custom-model")
    assert seen and seen[0]["trust_remote_code"] is False


def test_every_transformers_load_says_trust_remote_code_false(tmp_path: Path, monkeypatch) -> None:
    folder = _saved_tiny(tmp_path / "llama")
    calls: dict[str, list[dict]] = {}
    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        original = cls.from_pretrained

        def recorded(*args, _original=original, _name=cls.__name__, **kwargs):
            calls.setdefault(_name, []).append(kwargs)
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", staticmethod(recorded))
    read_header(str(folder))
    load_model(str(folder))
    assert set(calls) == {"AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"}
    assert all(kwargs.get("trust_remote_code") is False for kwargs_list in calls.values() for kwargs in kwargs_list)


# ----------------------------------------------------------------------------- the header, before any weight


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_header_describes_the_model_without_loading_weights(tmp_path: Path, family: str, monkeypatch) -> None:
    folder = _saved_tiny(tmp_path / family, family)
    loaded, _ = tiny_model(family)
    with monkeypatch.context() as patch:
        patch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                      staticmethod(lambda *a, **k: pytest.fail("the header loaded weights")))
        header = read_header(str(folder))
    assert [(ref.name, ref.numel) for ref in header.refs] == [(ref.name, ref.numel) for ref in linear_layers(loaded)]
    assert header.n_blocks == 3 and header.n_params == sum(p.numel() for p in loaded.parameters())
    assert header.context_length == 256
    assert header.position_limit == (256 if family == "gpt2" else None)  # RoPE has no table to overflow


def test_a_model_that_would_not_fit_is_refused_with_the_numbers(monkeypatch: pytest.MonkeyPatch, tiny_data) -> None:
    from prune_env import context, models

    header = read_header("tiny-llama")
    need = header.n_params * 4 * models.RESIDENT_COPIES
    monkeypatch.setattr(context, "private_model", lambda *a, **k: pytest.fail("weights loaded before the estimate"))
    monkeypatch.setattr(models, "available_memory", lambda device: need - 1)
    with pytest.raises(ModelSpecError) as error:
        context.PruningContext("tiny-llama", data=tiny_data)
    message = str(error.value)
    assert f"{header.n_params:,} parameters x 4 bytes (float32) x {models.RESIDENT_COPIES} copies" in message
    assert "tiny-llama" in message and "available" in message and "\n" not in message
    check_memory(header, "bfloat16", "cpu")  # half the bytes fit
    monkeypatch.setattr(models, "available_memory", lambda device: need)
    check_memory(header, "float32", "cpu")
