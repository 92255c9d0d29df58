"""The PyTorch model against Hugging Face transformers on tiny random checkpoints."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from plateforme.python_backend.model import ModelArgs, MoeArgs, load_model
from plateforme.python_backend.model.weights import INDEX_FILE, SINGLE_FILE

CHECKPOINTS = ["tiny_mistral_dir", "tiny_mixtral_dir"]


@pytest.fixture(params=CHECKPOINTS)
def model_dir(request):
    return request.getfixturevalue(request.param)


def hf_model(model_dir, dtype=torch.float32, **overrides):
    # Eager experts: HF's default grouped_mm kernel rounds differently in bf16.
    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, experts_implementation="eager", **overrides
    ).eval()


def prompt(n: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens[None]).logits[0].float()


# --- config --------------------------------------------------------------------------------------

MISTRAL_CONFIG = {
    "architectures": ["MistralForCausalLM"],
    "vocab_size": 32768,
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
}


def test_args_from_tiny_configs(tiny_mistral_dir, tiny_mixtral_dir):
    mistral = ModelArgs.from_hf_config(json.loads((tiny_mistral_dir / "config.json").read_text()))
    assert (mistral.dim, mistral.n_heads, mistral.n_kv_heads, mistral.head_dim) == (64, 4, 2, 16)
    assert (mistral.sliding_window, mistral.vocab_size, mistral.moe) == (16, 32768, None)
    assert mistral.rope_theta == 10000.0  # from transformers 5's rope_parameters
    mixtral = ModelArgs.from_hf_config(json.loads((tiny_mixtral_dir / "config.json").read_text()))
    assert mixtral.moe == MoeArgs(num_experts=8, num_experts_per_tok=2)
    assert (mixtral.sliding_window, mixtral.rope_theta, mixtral.norm_eps) == (None, 1e6, 1e-5)


def test_args_from_older_and_llama_configs():
    args = ModelArgs.from_hf_config(MISTRAL_CONFIG)
    assert (args.rope_theta, args.head_dim, args.hidden_dim, args.sliding_window) == (1e6, 128, 14336, None)
    llama = ModelArgs.from_hf_config(
        {**MISTRAL_CONFIG, "architectures": ["LlamaForCausalLM"], "sliding_window": 4096, "head_dim": 64,
         "tie_word_embeddings": True, "rope_theta": None, "rope_scaling": None}
    )
    assert (llama.sliding_window, llama.head_dim, llama.tie_embeddings) == (None, 64, True)
    assert llama.rope_theta == 1e4  # null rope_theta: the architecture's default


@pytest.mark.parametrize(
    "change, message",
    [
        ({"architectures": ["Qwen2ForCausalLM"]}, "unsupported architecture"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported RoPE scaling 'yarn'"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "RoPE scaling 'llama3'"),
        ({"num_key_value_heads": 5}, "not a multiple"),
        ({"hidden_size": None}, "lacks 'hidden_size'"),
        ({"num_attention_heads": "four"}, "num_attention_heads must be a positive integer, got 'four'"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"attention_bias": True}, "attention_bias"),
    ],
)
def test_args_reject_unsupported_configs(change, message):
    with pytest.raises(ValueError, match=message):
        ModelArgs.from_hf_config({**MISTRAL_CONFIG, **change})


# --- numerics ------------------------------------------------------------------------------------


def test_prefill_logits_match_transformers(model_dir):
    hf = hf_model(model_dir)
    model = load_model(model_dir, dtype=torch.float32)
    tokens = prompt(40, model.args.vocab_size)  # longer than the tiny Mistral's 16-token window
    with torch.inference_mode():
        ours = model(tokens)
    assert ours.shape == (40, model.args.vocab_size)
    torch.testing.assert_close(ours, hf_logits(hf, tokens), atol=1e-4, rtol=0)
    with torch.inference_mode():
        last = model(tokens, last_only=True)
    torch.testing.assert_close(last, ours[-1:], atol=1e-5, rtol=0)


def test_sliding_window_is_exercised(tiny_mistral_dir):
    """The 40-token comparison would not notice a missing window unless the window changes the logits."""
    tokens = prompt(40, 32768)
    windowed = hf_logits(hf_model(tiny_mistral_dir), tokens)
    full = hf_logits(hf_model(tiny_mistral_dir, sliding_window=None), tokens)
    torch.testing.assert_close(windowed[:16], full[:16])
    assert (windowed[16:] - full[16:]).abs().max() > 1e-2


def test_cached_decode_matches_transformers(model_dir):
    """Prefill 20 tokens, a 5-token chunk, then one token at a time: each step's logits equal
    those of HF's single pass over the 40 tokens."""
    hf = hf_model(model_dir)
    model = load_model(model_dir, dtype=torch.float32)
    tokens = prompt(40, model.args.vocab_size, seed=1)
    reference = hf_logits(hf, tokens)
    cache = model.new_cache(40)
    with torch.inference_mode():
        steps = [model(tokens[:20], 0, cache), model(tokens[20:25], 20, cache)]
        steps += [model(tokens[i : i + 1], i, cache) for i in range(25, 40)]
    torch.testing.assert_close(torch.cat(steps), reference, atol=1e-4, rtol=0)


def test_cache_bounds_are_checked(tiny_mistral_dir):
    model = load_model(tiny_mistral_dir, dtype=torch.float32)
    cache = model.new_cache(8)
    with torch.inference_mode():
        model(prompt(4, 32768), 0, cache)
        with pytest.raises(ValueError, match="cannot continue at position 6"):
            model(prompt(1, 32768), 6, cache)
        with pytest.raises(ValueError, match="exceed the cache's 8 positions"):
            model(prompt(5, 32768), 4, cache)
        with pytest.raises(ValueError, match="needs a KV cache"):
            model(prompt(1, 32768), 3)


def test_bfloat16_matches_transformers(model_dir):
    hf = hf_model(model_dir, dtype=torch.bfloat16)
    model = load_model(model_dir)  # bfloat16 by default
    assert model.dtype == torch.bfloat16 and model.layers[0].attention.wq.weight.dtype == torch.bfloat16
    # oneDNN-prepacked where the CPU computes bfloat16 natively: the comparison below covers that path.
    assert (model.packed_output is not None) == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    tokens = prompt(40, model.args.vocab_size)
    with torch.inference_mode():
        ours = model(tokens)
    assert ours.dtype == torch.float32 and torch.isfinite(ours).all()
    torch.testing.assert_close(ours, hf_logits(hf, tokens), atol=1e-2, rtol=0)


# --- weight loading ------------------------------------------------------------------------------


def rewrite_checkpoint(src, dst, edit):
    """Copy a checkpoint, passing its tensors through ``edit(dict) -> dict``."""
    shutil.copytree(src, dst)
    with safe_open(src / SINGLE_FILE, framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    save_file(edit(tensors), dst / SINGLE_FILE, metadata={"format": "pt"})
    return dst


def test_missing_tensor_is_named(tiny_mixtral_dir, tmp_path):
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    bad = rewrite_checkpoint(
        tiny_mixtral_dir, tmp_path / "m", lambda t: {k: v for k, v in t.items() if k != name}
    )
    with pytest.raises(ValueError, match=f"lacks 1 tensor.*{name}"):
        load_model(bad)


def test_wrong_shape_is_named(tiny_mistral_dir, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"
    bad = rewrite_checkpoint(tiny_mistral_dir, tmp_path / "m", lambda t: {**t, name: t[name][:16]})
    with pytest.raises(ValueError, match=rf"{name} has shape \[16, 64\], expected \[32, 64\]"):
        load_model(bad)


def test_unexpected_tensor_is_named(tiny_mistral_dir, tmp_path):
    bad = rewrite_checkpoint(
        tiny_mistral_dir, tmp_path / "m", lambda t: {**t, "model.layers.0.mlp.extra.weight": torch.zeros(2)}
    )
    with pytest.raises(ValueError, match="unexpected tensor.*model.layers.0.mlp.extra.weight"):
        load_model(bad)


def test_missing_files_are_reported(tmp_path, tiny_mistral_dir):
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path)
    shutil.copy(tiny_mistral_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(ValueError, match=f"neither {SINGLE_FILE} nor {INDEX_FILE}"):
        load_model(tmp_path)


def test_sharded_checkpoint_loads(tiny_mixtral_dir, tmp_path):
    shutil.copy(tiny_mixtral_dir / "config.json", tmp_path / "config.json")
    with safe_open(tiny_mixtral_dir / SINGLE_FILE, framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    weight_map = {}
    for i, shard in enumerate([{k: v for k, v in tensors.items() if "layers.1." in k},
                               {k: v for k, v in tensors.items() if "layers.1." not in k}]):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file(shard, tmp_path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    (tmp_path / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    tokens = prompt(12, 32000)
    with torch.inference_mode():
        sharded = load_model(tmp_path, dtype=torch.float32)(tokens)
        single = load_model(tiny_mixtral_dir, dtype=torch.float32)(tokens)
    torch.testing.assert_close(sharded, single, atol=0, rtol=0)


def test_tied_embeddings(tiny_mistral_dir, tmp_path):
    tied = rewrite_checkpoint(
        tiny_mistral_dir, tmp_path / "m", lambda t: {k: v for k, v in t.items() if k != "lm_head.weight"}
    )
    config = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    model = load_model(tied, dtype=torch.float32)
    assert model.output.weight is model.tok_embeddings.weight
    tokens = prompt(20, 32768)
    with torch.inference_mode():
        ours = model(tokens)
    torch.testing.assert_close(ours, hf_logits(hf_model(tied), tokens), atol=1e-4, rtol=0)
