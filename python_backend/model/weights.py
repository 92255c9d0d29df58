"""Load a Hugging Face safetensors checkpoint into a :class:`Transformer` without building the HF model."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .args import ModelArgs
from .transformer import Transformer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Parameter names inside a layer: ours -> HF's.
_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.gate.weight": "block_sparse_moe.gate.weight",
}
_TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_EXPERT = re.compile(r"feed_forward\.experts\.(\d+)\.(w[123]\.weight)")


def hf_name(name: str) -> str:
    """HF on-disk name of one of our parameter names."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    layer = _LAYER.fullmatch(name)
    if layer is None:
        raise KeyError(name)
    i, rest = layer.groups()
    expert = _EXPERT.fullmatch(rest)
    # Mixtral experts keep the original w1 (gate), w2 (down), w3 (up) names on disk.
    hf_rest = f"block_sparse_moe.experts.{expert[1]}.{expert[2]}" if expert else _LAYER_NAMES[rest]
    return f"model.layers.{i}.{hf_rest}"


def _ignorable(name: str, args: ModelArgs) -> bool:
    """Tensors some checkpoints carry that the model does not need."""
    # Old Llama exports store RoPE frequencies; tied checkpoints may still store lm_head.
    return name.endswith("rotary_emb.inv_freq") or (args.tie_embeddings and name == "lm_head.weight")


def read_args(model_dir: str | Path) -> ModelArgs:
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        raise ValueError(f"{model_dir} has no config.json")
    return ModelArgs.from_hf_config(json.loads(config.read_text()))


def checkpoint_files(model_dir: str | Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it (single file or sharded with an index)."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no weight_map")
        files = {name: model_dir / shard for name, shard in weight_map.items()}
        for shard in set(files.values()):
            if not shard.is_file():
                raise ValueError(f"{index} names shard {shard.name}, which is missing")
        return files
    single = model_dir / SINGLE_FILE
    if single.is_file():
        try:
            with safe_open(single, framework="pt") as f:
                return {name: single for name in f.keys()}
        except SafetensorError as exc:
            raise ValueError(f"{single} is not a readable safetensors file ({exc})") from None
    if any(model_dir.glob("pytorch_model*.bin")):
        raise ValueError(f"{model_dir} holds PyTorch .bin weights, which are not read: save them as safetensors")
    raise ValueError(f"{model_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def load_model(
    model_dir: str | Path, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu"
) -> Transformer:
    """Read config.json and the safetensors weights of ``model_dir`` into an inference-mode Transformer."""
    args = read_args(model_dir)
    # Built on the meta device: no memory or random init for weights that are replaced anyway.
    with torch.device("meta"):
        model = Transformer(args)
    expected = {hf_name(name): (name, param.shape) for name, param in model.named_parameters()}
    if args.tie_embeddings:
        del expected["lm_head.weight"]

    files = checkpoint_files(model_dir)
    missing = sorted(set(expected) - set(files))
    if missing:
        raise ValueError(
            f"checkpoint in {model_dir} lacks {len(missing)} tensor(s): {', '.join(missing[:5])}"
        )
    unexpected = sorted(n for n in set(files) - set(expected) if not _ignorable(n, args))
    if unexpected:
        raise ValueError(
            f"checkpoint in {model_dir} has {len(unexpected)} unexpected tensor(s): "
            f"{', '.join(unexpected[:5])}"
        )

    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)
    # Shapes come from the file headers: check them all before reading any data.
    for path, names in by_file.items():
        with safe_open(path, framework="pt") as f:
            for name in names:
                found, shape = f.get_slice(name).get_shape(), list(expected[name][1])
                if found != shape:
                    raise ValueError(f"tensor {name} has shape {found}, expected {shape}")

    state: dict[str, torch.Tensor] = {}
    for path, names in by_file.items():
        with safe_open(path, framework="pt", device=str(torch.device(device))) as f:
            for name in names:
                state[expected[name][0]] = f.get_tensor(name).to(dtype)

    model.load_state_dict(state, strict=not args.tie_embeddings, assign=True)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.fuse_projections()
    model.use_cpu_kernels()
    model.pack_weights()
    return model.eval().requires_grad_(False)
