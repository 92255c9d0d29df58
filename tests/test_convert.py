"""HF checkpoint -> TensorRT-LLM checkpoint: rank arithmetic, the layout (proven by a forward pass over
the rank files against HF transformers' logits), streaming memory, atomic output and clear errors."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from plateforme.builders import convert as convert_module
from plateforme.builders.convert import ConversionError, convert_checkpoint, pad_vocab
from plateforme.builders.engine_manifest import read_checkpoint_record, tokenizer_digest
from plateforme.builders.mapping import Mapping, MappingError
from plateforme.cli import main

sys.path.insert(0, str(Path(__file__).parent))
import trtllm_reference  # noqa: E402  (a module beside the tests)

TOKENS = torch.randint(3, 32000, (40,), generator=torch.Generator().manual_seed(0))  # > the window of 16


# -- rank arithmetic --------------------------------------------------------------------------
def groups(mapping: Mapping, key) -> list[list[int]]:
    found: dict = {}
    for rank in range(mapping.world_size):
        found.setdefault(key(mapping.position(rank)), []).append(rank)
    return sorted(found.values())


def test_rank_groups_match_tensorrt_llm_documentation():
    # tensorrt_llm/mapping.py: "2 nodes with 16 GPUs, moe_tp_size = 2, moe_ep_size = 4, pp_size = 2".
    m = Mapping.create(tp=8, pp=2, moe_tp=2, moe_ep=4)
    assert groups(m, lambda p: (p.pp_rank, p.moe_ep_rank)) == [
        [0, 4], [1, 5], [2, 6], [3, 7], [8, 12], [9, 13], [10, 14], [11, 15]]  # moe_tp groups
    assert groups(m, lambda p: (p.pp_rank, p.moe_tp_rank)) == [
        [0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]  # moe_ep groups
    assert groups(m, lambda p: p.tp_rank) == [[i, i + 8] for i in range(8)]  # pp groups
    assert m.to_config() == {"world_size": 16, "tp_size": 8, "pp_size": 2, "moe_tp_size": 2, "moe_ep_size": 4}


@pytest.mark.parametrize("layers,pp", [(2, 2), (7, 3), (32, 4), (5, 5), (56, 3)])
def test_pipeline_stages_split_layers_like_torch_tensor_split(layers, pp):
    mapping = Mapping(pp_size=pp)
    expected = [chunk.tolist() for chunk in torch.tensor_split(torch.arange(layers), pp)]
    assert [mapping.pp_layers(layers, stage) for stage in range(pp)] == expected


def test_moe_sizes_default_like_tensorrt_llm():
    assert Mapping.create(4) == Mapping(4, 1, 4, 1)  # MoE tensor parallelism by default
    assert Mapping.create(4, moe_ep=4) == Mapping(4, 1, 1, 4)
    assert Mapping.create(8, moe_tp=2) == Mapping(8, 1, 2, 4)
    assert Mapping(4, 1, 2, 2).ep_experts(8, 1) == [4, 5, 6, 7]


@pytest.mark.parametrize("make,message", [
    (lambda: Mapping(tp_size=4, moe_tp_size=2, moe_ep_size=1),
     r"moe_tp_size \(2\) x moe_ep_size \(1\) = 2 must equal tp_size \(4\)"),
    (lambda: Mapping.create(4, moe_ep=3), r"moe_ep_size \(3\) must divide tp_size \(4\)"),
    (lambda: Mapping.create(0), "positive integer"),
    (lambda: Mapping.create(2).check_model(num_layers=2, num_heads=3, num_kv_heads=3, intermediate_size=8),
     r"tp_size \(2\) does not divide num_attention_heads \(3\)"),
    (lambda: Mapping.create(6).check_model(num_layers=2, num_heads=12, num_kv_heads=4, intermediate_size=12),
     r"tp_size \(6\) must be a multiple of num_key_value_heads \(4\)"),
    (lambda: Mapping.create(2, moe_ep=2).check_model(num_layers=2, num_heads=4, num_kv_heads=2,
                                                     intermediate_size=8, num_experts=3),
     r"moe_ep_size \(2\) does not divide the 3 experts"),
    (lambda: Mapping.create(2, moe_ep=2).check_model(num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=8),
     "no experts"),
    (lambda: Mapping.create(1, 3).check_model(num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=8),
     r"pp_size \(3\) exceeds the 2 layers"),
])
def test_bad_mappings_are_refused_clearly(make, message):
    with pytest.raises(MappingError, match=message):
        make()


# -- the layout carries the model -------------------------------------------------------------
def hf_logits(model_dir: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, experts_implementation="eager")
    with torch.no_grad():
        return model.eval()(TOKENS[None]).logits[0].float()


@pytest.fixture(scope="module")
def mistral_logits(tiny_mistral_dir):
    return hf_logits(tiny_mistral_dir)


@pytest.fixture(scope="module")
def mixtral_logits(tiny_mixtral_dir):
    return hf_logits(tiny_mixtral_dir)


MAPPINGS = {
    "tp1": dict(tp=1),
    "tp2": dict(tp=2),
    "pp2": dict(pp=2),
    "tp2-ep2": dict(tp=2, moe_ep=2),
    "tp4-moetp2-ep2": dict(tp=4, moe_tp=2, moe_ep=2),
}


@pytest.mark.parametrize("layout", list(MAPPINGS))
def test_mixtral_rank_files_reproduce_hf_logits(tmp_path, tiny_mixtral_dir, mixtral_logits, layout):
    mapping = Mapping.create(**MAPPINGS[layout])
    out = convert_checkpoint(tiny_mixtral_dir, tmp_path / "ckpt", "float32", mapping, progress=False).out_dir
    assert sorted(p.name for p in out.glob("rank*.safetensors")) == [
        f"rank{r}.safetensors" for r in range(mapping.world_size)]
    torch.testing.assert_close(trtllm_reference.forward(out, TOKENS), mixtral_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2", "tp4"])
def test_mistral_rank_files_reproduce_hf_logits_with_the_sliding_window(tmp_path, tiny_mistral_dir,
                                                                       mistral_logits, layout):
    # tp4 with 2 KV heads: each KV head is copied to two ranks.
    mapping = Mapping.create(**MAPPINGS.get(layout, dict(tp=4)))
    out = convert_checkpoint(tiny_mistral_dir, tmp_path / "ckpt", "float32", mapping, progress=False).out_dir
    assert read_checkpoint_record(out)["source"]["sliding_window"] == 16
    ours = trtllm_reference.forward(out, TOKENS, max_attention_window_size=16)
    torch.testing.assert_close(ours, mistral_logits, atol=1e-4, rtol=0)
    # 40 tokens > window 16: without the window the logits differ, so the comparison above covers it.
    assert (trtllm_reference.forward(out, TOKENS) - mistral_logits).abs().max() > 1e-2


def test_a_wrong_expert_layout_is_caught(tmp_path, tiny_mixtral_dir, mixtral_logits):
    out = convert_checkpoint(tiny_mixtral_dir, tmp_path / "ckpt", "float32", progress=False).out_dir
    weights = load_file(out / "rank0.safetensors")
    fc = weights["transformer.layers.0.mlp.fc.weight"]
    up, gate = fc.chunk(2, dim=1)
    weights["transformer.layers.0.mlp.fc.weight"] = torch.cat([gate, up], dim=1).contiguous()  # [w1; w3]
    save_file(weights, out / "rank0.safetensors")
    assert (trtllm_reference.forward(out, TOKENS) - mixtral_logits).abs().max() > 1e-2


def test_mixtral_rank_tensors(tmp_path, tiny_mixtral_dir):
    mapping = Mapping.create(tp=4, moe_tp=2, moe_ep=2)
    out = convert_checkpoint(tiny_mixtral_dir, tmp_path / "ckpt", "bfloat16", mapping, progress=False).out_dir
    hf = load_file(tiny_mixtral_dir / "model.safetensors")
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "MixtralForCausalLM" and config["dtype"] == "bfloat16"
    assert config["hidden_act"] == "swiglu" and config["position_embedding_type"] == "rope_gpt_neox"
    assert config["moe"] == {"num_experts": 8, "top_k": 2, "normalization_mode": 1}
    assert config["mapping"] == {"world_size": 4, "tp_size": 4, "pp_size": 1, "moe_tp_size": 2, "moe_ep_size": 2}
    rank3 = load_file(out / "rank3.safetensors")  # tp_rank 3: moe_ep_rank 1 (experts 4-7), moe_tp_rank 1
    router = rank3["transformer.layers.1.mlp.router.weight"]
    assert router.dtype == torch.float32
    torch.testing.assert_close(router, hf["model.layers.1.block_sparse_moe.gate.weight"], atol=0, rtol=0)
    fc, proj = rank3["transformer.layers.1.mlp.fc.weight"], rank3["transformer.layers.1.mlp.proj.weight"]
    assert fc.dtype == torch.bfloat16 and fc.shape == (4, 128, 64) and proj.shape == (4, 64, 64)
    expert = "model.layers.1.block_sparse_moe.experts.5."
    torch.testing.assert_close(fc[1], torch.cat([hf[expert + "w3.weight"][64:], hf[expert + "w1.weight"][64:]])
                               .to(torch.bfloat16), atol=0, rtol=0)
    torch.testing.assert_close(proj[1], hf[expert + "w2.weight"][:, 64:].to(torch.bfloat16), atol=0, rtol=0)
    # 2 KV heads over 4 ranks: rank 3 holds KV head 1.
    qkv = rank3["transformer.layers.0.attention.qkv.weight"]
    k = hf["model.layers.0.self_attn.k_proj.weight"][16:32]
    torch.testing.assert_close(qkv[16:32], k.to(torch.bfloat16), atol=0, rtol=0)


def test_tied_embeddings_and_vocab_padding(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1001, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "llama")
    tokens = torch.randint(0, 1001, (12,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(tokens[None]).logits[0]
    out = convert_checkpoint(tmp_path / "llama", tmp_path / "ckpt", "float32", Mapping.create(4), progress=False)
    heads = [load_file(out.out_dir / f"rank{r}.safetensors")["lm_head.weight"] for r in range(4)]
    assert pad_vocab(1001, 4) == 1004 and all(h.shape == (251, 32) for h in heads)
    assert heads[3][-3:].abs().max() == 0  # padding rows are zero
    torch.testing.assert_close(trtllm_reference.forward(out.out_dir, tokens), expected, atol=1e-4, rtol=0)
    assert read_checkpoint_record(out.out_dir)["tokenizer"]["digest"] is None  # no tokenizer files there


def test_record_digests_the_written_files(tmp_path, tiny_mistral_dir):
    out = convert_checkpoint(tiny_mistral_dir, tmp_path / "ckpt", "bfloat16", Mapping.create(2), progress=False)
    record = read_checkpoint_record(out.out_dir)
    import hashlib

    for name, info in record["files"].items():
        data = (out.out_dir / name).read_bytes()
        assert info == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert record["tokenizer"]["digest"] == tokenizer_digest(tiny_mistral_dir) is not None
    with safe_open(out.out_dir / "rank1.safetensors", framework="pt") as handle:  # readable by safetensors
        assert handle.get_tensor("lm_head.weight").dtype == torch.bfloat16


# -- errors and atomicity ---------------------------------------------------------------------
def edited_copy(source: Path, target: Path, edit) -> Path:
    target.mkdir()
    (target / "config.json").write_text((source / "config.json").read_text())
    tensors = load_file(source / "model.safetensors")
    edit(tensors, target)
    save_file(tensors, target / "model.safetensors")
    return target


@pytest.mark.parametrize("edit,message", [
    (lambda t, d: t.pop("model.layers.1.self_attn.k_proj.weight"), "lacks 1 tensor.*layers.1.self_attn.k_proj"),
    (lambda t, d: t.update({"model.layers.9.extra.weight": torch.zeros(2)}), "unexpected tensor.*layers.9.extra"),
    (lambda t, d: t.update({"model.norm.weight": torch.zeros(63)}),
     r"model.norm.weight has shape \[63\], expected \[64\]"),
    (lambda t, d: (d / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]})),
     "unsupported architecture.*GPT2LMHeadModel"),
])
def test_bad_checkpoints_are_refused_before_writing(tmp_path, tiny_mistral_dir, edit, message):
    broken = edited_copy(tiny_mistral_dir, tmp_path / "broken", edit)
    with pytest.raises(ConversionError, match=message):
        convert_checkpoint(broken, tmp_path / "ckpt", progress=False)
    assert not (tmp_path / "ckpt").exists()


def test_truncated_weights_and_malformed_config_are_named(tmp_path, tiny_mistral_dir):
    broken = edited_copy(tiny_mistral_dir, tmp_path / "broken", lambda t, d: None)
    weights = broken / "model.safetensors"
    names = list(load_file(weights))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    with pytest.raises(ConversionError, match=r"model.safetensors is not a readable safetensors file"):
        convert_checkpoint(broken, tmp_path / "ckpt", progress=False)
    # Named by an index, as the shards of a large checkpoint are: the header is read, then checked.
    (broken / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": dict.fromkeys(names, "model.safetensors")}))
    with pytest.raises(ConversionError, match=r"model.safetensors is truncated: its header describes \d+ bytes"):
        convert_checkpoint(broken, tmp_path / "ckpt", progress=False)
    (broken / "config.json").write_text('{"architectures": ["MistralForCausalLM"],')
    with pytest.raises(ConversionError, match=r"config.json is not valid JSON"):
        convert_checkpoint(broken, tmp_path / "ckpt", progress=False)
    assert not (tmp_path / "ckpt").exists()


def test_a_crash_leaves_no_checkpoint_behind(tmp_path, tiny_mistral_dir, monkeypatch):
    real = convert_module._read_chunks
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 10:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(convert_module, "_read_chunks", failing)
    with pytest.raises(OSError, match="disk full"):
        convert_checkpoint(tiny_mistral_dir, tmp_path / "ckpt", progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a partial directory


def test_refuses_to_replace_a_directory_that_is_not_a_checkpoint(tmp_path, tiny_mistral_dir):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(ConversionError, match="holds no checkpoint written by plateforme convert"):
        convert_checkpoint(tiny_mistral_dir, tmp_path / "precious", progress=False)
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


def test_cli_convert(tmp_path, tiny_mixtral_dir, capsys):
    assert main(["convert", str(tiny_mixtral_dir), str(tmp_path / "ckpt"), "--tp", "2", "--moe-ep", "2",
                 "--quiet"]) == 0
    assert "world size 2: tp 2, pp 1 (MoE: moe_tp 1 x moe_ep 2)" in capsys.readouterr().out
    assert main(["convert", str(tiny_mixtral_dir), str(tmp_path / "bad"), "--tp", "4", "--moe-tp", "3",
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "plateforme convert: error: moe_tp_size (3) must divide tp_size (4)"
    # An output where nobody may write (/proc, even for root): the system's error, without a traceback.
    assert main(["convert", str(tiny_mixtral_dir), "/proc/plateforme-ckpt", "--quiet"]) == 2
    assert capsys.readouterr().err.startswith("plateforme convert: error: [Errno")


# -- memory stays bounded ---------------------------------------------------------------------
# Peak RSS as VmHWM: getrusage's ru_maxrss would include this (large) test process's RSS at fork.
CHILD = textwrap.dedent("""
    import sys
    from plateforme.builders.convert import convert_checkpoint
    from plateforme.builders.mapping import Mapping
    if len(sys.argv) > 1:
        convert_checkpoint(sys.argv[1], sys.argv[2], "bfloat16", Mapping.create(2), progress=False,
                           chunk_bytes=4 << 20)
    with open("/proc/self/status") as status:
        print(next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:")))
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_conversion_memory_is_bounded_by_the_chunk_not_the_checkpoint(tmp_path):
    """A 128 MB checkpoint whose largest tensors are 32 MB converts with a fraction of that in memory."""
    source = tmp_path / "src"
    source.mkdir()
    vocab, hidden, inter = 8192, 1024, 4096
    g = torch.Generator().manual_seed(0)
    p = "model.layers.0."
    tensors = {
        "model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g),
        "lm_head.weight": torch.randn(vocab, hidden, generator=g),
        "model.norm.weight": torch.ones(hidden),
        p + "input_layernorm.weight": torch.ones(hidden),
        p + "post_attention_layernorm.weight": torch.ones(hidden),
        p + "self_attn.q_proj.weight": torch.randn(hidden, hidden, generator=g),
        p + "self_attn.k_proj.weight": torch.randn(256, hidden, generator=g),
        p + "self_attn.v_proj.weight": torch.randn(256, hidden, generator=g),
        p + "self_attn.o_proj.weight": torch.randn(hidden, hidden, generator=g),
        p + "mlp.gate_proj.weight": torch.randn(inter, hidden, generator=g),
        p + "mlp.up_proj.weight": torch.randn(inter, hidden, generator=g),
        p + "mlp.down_proj.weight": torch.randn(hidden, inter, generator=g),
    }
    save_file(tensors, source / "model.safetensors")
    del tensors
    (source / "config.json").write_text(json.dumps({
        "architectures": ["MistralForCausalLM"], "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": 1, "num_attention_heads": 8, "num_key_value_heads": 2,
        "max_position_embeddings": 1024, "sliding_window": None,
    }))
    size = (source / "model.safetensors").stat().st_size

    def peak(*args: str) -> int:
        result = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, check=True)
        return int(result.stdout.split()[-1])

    baseline = peak()  # the same interpreter and imports, converting nothing
    converted = peak(str(source), str(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / "rank1.safetensors").is_file()
    assert 0 < converted - baseline < 0.35 * size, (converted - baseline, size)
