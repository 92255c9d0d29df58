"""A forward pass over a TensorRT-LLM checkpoint, computed the way its ranks would compute it.

Written from TensorRT-LLM's documented semantics only (it shares no code with the converter):
each tensor-parallel rank runs attention over its own heads and the MLP/MoE over its own slice,
partial outputs are summed (the all-reduce), pipeline stages run their local layers in turn, and
the vocabulary slices of `lm_head` are gathered. Matching Hugging Face's logits is the proof that
the rank files carry the model.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file


def _rank_positions(mapping: dict) -> list[dict]:
    """TensorRT-LLM's rank arithmetic (tensorrt_llm/mapping.py)."""
    tp, pp = mapping["tp_size"], mapping["pp_size"]
    ep = mapping.get("moe_ep_size", 1)
    positions = []
    for rank in range(tp * pp):
        tp_rank = rank % tp
        positions.append({
            "rank": rank, "tp_rank": tp_rank, "pp_rank": rank // tp,
            "moe_ep_rank": tp_rank % ep, "moe_tp_rank": tp_rank // ep,
        })
    return positions


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x: torch.Tensor, base: float) -> torch.Tensor:
    """rope_gpt_neox on x [T, heads, head_size]: rotate the two halves of each head."""
    n, _, d = x.shape
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(n, dtype=torch.float64)[:, None] * inv_freq[None]
    cos = torch.cat([angles.cos(), angles.cos()], -1)[:, None].float()
    sin = torch.cat([angles.sin(), angles.sin()], -1)[:, None].float()
    first, second = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-second, first], -1) * sin


def _attention(q, k, v, window: int | None) -> torch.Tensor:
    """Causal attention of q [T, Hq, d] over k, v [T, Hkv, d]; a query sees at most `window` keys."""
    n, hq, d = q.shape
    group = hq // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / d**0.5
    pos = torch.arange(n)
    visible = pos[None, :] <= pos[:, None]
    if window:
        visible &= pos[None, :] > pos[:, None] - window
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def load_ranks(checkpoint_dir: str | Path) -> tuple[dict, list[dict[str, torch.Tensor]]]:
    checkpoint_dir = Path(checkpoint_dir)
    config = json.loads((checkpoint_dir / "config.json").read_text())
    world = config["mapping"]["world_size"]
    ranks = [load_file(checkpoint_dir / f"rank{r}.safetensors") for r in range(world)]
    return config, ranks


def forward(
    checkpoint_dir: str | Path, tokens: torch.Tensor, max_attention_window_size: int | None = None
) -> torch.Tensor:
    """Float32 logits [T, vocab_size] for `tokens` [T] (positions 0..T-1)."""
    config, ranks = load_ranks(checkpoint_dir)
    weights = [{k: v.float() for k, v in r.items()} for r in ranks]
    positions = _rank_positions(config["mapping"])
    tp, pp = config["mapping"]["tp_size"], config["mapping"]["pp_size"]
    eps, base, d = config["norm_epsilon"], config["rotary_base"], config["head_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    q_local, kv_local = heads // tp, max(1, kv_heads // tp)
    moe = config.get("moe", {}).get("num_experts", 0) > 1

    stage0 = [weights[p["rank"]] for p in positions if p["pp_rank"] == 0]
    h = stage0[0]["transformer.vocab_embedding.weight"][tokens]
    n = tokens.shape[0]
    for stage in range(pp):
        members = [p for p in positions if p["pp_rank"] == stage]
        shards = [weights[p["rank"]] for p in members]
        n_layers = len({k.split(".")[2] for k in shards[0] if k.startswith("transformer.layers.")})
        for i in range(n_layers):
            pre = f"transformer.layers.{i}."
            x = _rms_norm(h, shards[0][pre + "input_layernorm.weight"], eps)
            attention = torch.zeros_like(h)
            for w in shards:  # each rank: its own heads, then the all-reduce (sum)
                qkv = x @ w[pre + "attention.qkv.weight"].T
                q, k, v = qkv.split([q_local * d, kv_local * d, kv_local * d], dim=-1)
                q = _rope(q.view(n, q_local, d), base)
                k = _rope(k.view(n, kv_local, d), base)
                out = _attention(q, k, v.view(n, kv_local, d), max_attention_window_size)
                attention += out.reshape(n, q_local * d) @ w[pre + "attention.dense.weight"].T
            h = h + attention
            x = _rms_norm(h, shards[0][pre + "post_layernorm.weight"], eps)
            mlp = torch.zeros_like(h)
            if moe:
                top_k = config["moe"]["top_k"]
                num_experts = config["moe"]["num_experts"]
                ep = config["mapping"].get("moe_ep_size", 1)
                for pos, w in zip(members, shards, strict=True):
                    router = w[pre + "mlp.router.weight"]
                    assert ranks[pos["rank"]][pre + "mlp.router.weight"].dtype == torch.float32
                    probs = (x @ router.T).softmax(-1)
                    top, chosen = probs.topk(top_k, dim=-1)
                    top = top / top.sum(-1, keepdim=True)  # normalization_mode 1: renormalise
                    fc, proj = w[pre + "mlp.fc.weight"], w[pre + "mlp.proj.weight"]
                    per_rank = num_experts // ep
                    for j in range(fc.shape[0]):
                        expert = pos["moe_ep_rank"] * per_rank + j
                        gate_weight = (top * (chosen == expert)).sum(-1, keepdim=True)
                        up, gate = (x @ fc[j].T).chunk(2, dim=-1)  # swiglu: x, gate = chunk(2)
                        mlp += gate_weight * ((F.silu(gate) * up) @ proj[j].T)
            else:
                for w in shards:
                    inter = F.silu(x @ w[pre + "mlp.fc.weight"].T) * (x @ w[pre + "mlp.gate.weight"].T)
                    mlp += inter @ w[pre + "mlp.proj.weight"].T
            h = h + mlp
    last = [weights[p["rank"]] for p in positions if p["pp_rank"] == pp - 1]
    h = _rms_norm(h, last[0]["transformer.ln_f.weight"], eps)
    logits = torch.cat([h @ w["lm_head.weight"].T for w in last], dim=-1)  # the all-gather
    return logits[:, : config["vocab_size"]]
