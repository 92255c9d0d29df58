"""Decoder-only transformer of the Mistral family (Mistral, Mixtral, Llama)."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs
from .attention import Attention, attention_mask, key_start
from .batch import BatchPlan, Segment, SlotKVCache
from . import cpu_kernels
from .cache import KVCache
from .cpu_kernels import BlockedWeight, CpuKernels, DecoderStack, StackLayer
from .moe import MoeLayer
from .packing import PackedWeight, RepackedWeight, linear, pack_into, packing_available
from .rope import rope_cos_sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, cast back, then scale: the order HF uses, which matters in bf16.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class FeedForward(nn.Module):
    """SwiGLU: w1 = gate, w3 = up, w2 = down."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        # [w1; w3] in one tensor once fuse() ran; w1 and w3 are then views into it.
        self.w13: torch.Tensor | None = None
        self.packed: dict[str, RepackedWeight] = {}  # "w13", "w2": see pack()

    def fuse(self) -> None:
        """One matmul for gate and up instead of two."""
        with torch.no_grad():
            fused = torch.cat([self.w1.weight, self.w3.weight])
        hidden = self.w1.weight.shape[0]
        self.w1.weight.data, self.w3.weight.data = fused[:hidden], fused[hidden:]
        self.w13 = fused

    def pack(self, repack: Callable[[torch.Tensor], RepackedWeight | None]) -> None:
        """Repacked copies (see Transformer.pack_weights) of the fused gate/up weight and of w2, where
        ``repack`` makes one."""
        pack_into(self.packed, {"w13": self.w13, "w2": self.w2.weight}, repack)

    def fused_weight_current(self) -> bool:
        """Whether the fused gate/up weight serves: only while w1 still points into it (as
        Attention.fused_weight_current)."""
        return self.w13 is not None and self.w13.data_ptr() == self.w1.weight.data_ptr()

    def forward(self, x: torch.Tensor, kernels: CpuKernels | None = None) -> torch.Tensor:
        if self.fused_weight_current():
            gate_up = linear(x, self.w13, self.packed.get("w13"))
            if kernels is not None:
                hidden = kernels.silu_mul(gate_up)
            else:
                gate, up = gate_up.chunk(2, dim=-1)
                hidden = F.silu(gate) * up
        else:
            hidden = F.silu(self.w1(x)) * self.w3(x)
        return linear(hidden, self.w2.weight, self.packed.get("w2"))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args.dim, args.n_heads, args.n_kv_heads, args.head_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward: nn.Module
        if args.moe is not None:
            self.feed_forward = MoeLayer(
                experts=[FeedForward(args.dim, args.hidden_dim) for _ in range(args.moe.num_experts)],
                gate=nn.Linear(args.dim, args.moe.num_experts, bias=False),
                args=args.moe,
            )
        else:
            self.feed_forward = FeedForward(args.dim, args.hidden_dim)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        start_pos: int,
        first_key: int,
        cache: KVCache | None,
        layer: int,
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, start_pos, first_key, cache, layer)
        return h + self.feed_forward(self.ffn_norm(h))

    def forward_batch(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan: BatchPlan,
                      layer: int) -> torch.Tensor:
        h = x + self.attention.forward_batch(self.attention_norm(x), cos, sin, plan, layer)
        return h + self.feed_forward(self.ffn_norm(h))

    def forward_batch_fused(self, h: torch.Tensor, normed: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                            plan: BatchPlan, layer: int, next_norm: RMSNorm, kernels: CpuKernels) -> torch.Tensor:
        """forward_batch with the CPU kernels: ``normed`` is attention_norm(h) and ``h`` the residual
        stream, updated in place. Returns ``next_norm(h)`` (the next layer's attention_norm, or the final
        norm): each residual add is fused with the norm that follows it."""
        attended = self.attention.forward_batch(normed, cos, sin, plan, layer, kernels)
        normed = kernels.add_rms_norm(h, attended, self.ffn_norm.weight, self.ffn_norm.eps)
        out = self.feed_forward(normed, kernels)
        return kernels.add_rms_norm(h, out, next_norm.weight, next_norm.eps)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        # With tied embeddings the loader points output.weight at tok_embeddings.weight.
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.packed_output: RepackedWeight | None = None
        self.cpu_kernels: CpuKernels | None = None  # see use_cpu_kernels()
        self.decoder_stack: DecoderStack | None = None  # see pack_weights()

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    def new_cache(self, max_len: int) -> KVCache:
        """An empty cache for one sequence of up to ``max_len`` positions."""
        return KVCache(self.args, max_len, self.dtype, self.device)

    def new_slot_cache(self, n_slots: int, max_seq_len: int) -> SlotKVCache:
        """A KV cache shared by up to ``n_slots`` in-flight sequences of up to ``max_seq_len`` positions."""
        return SlotKVCache(self.args, n_slots, max_seq_len, self.dtype, self.device)

    def forward_batch(self, tokens: torch.Tensor, segments: list[Segment], cache: SlotKVCache) -> torch.Tensor:
        """Float32 logits [len(segments), vocab] of each segment's last token.

        ``tokens`` [N] are the segments' tokens, concatenated in order: decode steps (one token
        at the sequence's next position) and prefill chunks mixed freely.
        """
        for seg in segments:
            if seg.start_pos + seg.n_tokens > self.args.max_position_embeddings:
                raise ValueError(
                    f"positions up to {seg.start_pos + seg.n_tokens - 1} exceed max_position_embeddings "
                    f"{self.args.max_position_embeddings}"
                )
        # The kernels need every layer's fused q/k/v weight (not the case after a reload, say); the
        # decoder stack checks that among the weights it watches.
        kernels = self.cpu_kernels
        stack = self.decoder_stack if kernels is not None else None
        if stack is not None and not stack.current():
            stack = None
        if kernels is not None and stack is None and not all(layer.attention.fused_weight_current()
                                                            for layer in self.layers):
            kernels = None
        plan = BatchPlan(segments, cache, tokens.device, kernel_attention=kernels is not None)
        if plan.n_tokens != tokens.shape[0]:
            raise ValueError(f"segments cover {plan.n_tokens} tokens, got {tokens.shape[0]}")
        h = self.tok_embeddings(tokens)
        cos, sin = rope_cos_sin(plan.token_positions, self.args.head_dim, self.args.rope_theta, h.dtype)
        if kernels is not None:
            first_norm = self.layers[0].attention_norm
            normed = kernels.rms_norm(h, first_norm.weight, first_norm.eps)
            if stack is not None and plan.all_kernel_tokens:
                stack(h, normed, cos, sin, cache.kv, cache.positions, plan.kernel_rows, plan.kernel_slots,
                      plan.kernel_query_pos, cache.window)
            else:
                for i, (layer, next_norm) in enumerate(zip(self.layers, self._next_norms())):
                    normed = layer.forward_batch_fused(h, normed, cos, sin, plan, i, next_norm, kernels)
            return self.logits(normed.index_select(0, plan.last_rows))
        for i, layer in enumerate(self.layers):
            h = layer.forward_batch(h, cos, sin, plan, i)
        return self.logits(self.norm(h.index_select(0, plan.last_rows)))

    def fuse_projections(self) -> None:
        """Fused q/k/v and gate/up weights: dense layers, and MoE experts on CPU, where each runs over
        its tokens like a dense layer (on CUDA the fused MoE kernel has its own layout)."""
        for layer in self.layers:
            layer.attention.fuse()
            for ffn in self._fusable_feed_forwards(layer):
                ffn.fuse()

    def _fusable_feed_forwards(self, layer: TransformerBlock) -> list[FeedForward]:
        ffn = layer.feed_forward
        if isinstance(ffn, FeedForward):
            return [ffn]
        return list(ffn.experts) if self.device.type == "cpu" else []

    def pack_weights(self) -> bool:
        """Repacked copies of the dense layers' weights and of the output projection, on CPU: for the CPU
        kernels' linear (cpu_kernels.py, bfloat16) where they have it, for oneDNN (packing.py; float32,
        or bfloat16 where it is native) otherwise. False (nothing done) where neither runs. MoE experts
        only for the linear kernel (oneDNN's float32 copy would double the experts' memory for
        little). After use_cpu_kernels(), so that the kernels' layout is used."""
        kernels = self.cpu_kernels
        on_kernel = kernels is not None and kernels.has_linear
        # oneDNN's bf16 needs AVX512 (an AVX2 CPU has the kernel's linear and not it).
        on_onednn = packing_available(self.dtype, self.device)
        if not (on_kernel or on_onednn):
            return False

        def repack(weight: torch.Tensor) -> RepackedWeight | None:
            blocked = kernels.blocked_weight(weight) if on_kernel else None
            if blocked is not None:
                return blocked
            return PackedWeight(weight) if on_onednn else None

        for layer in self.layers:
            layer.attention.pack(repack)
            if isinstance(layer.feed_forward, FeedForward):
                layer.feed_forward.pack(repack)
            elif on_kernel:
                for expert in self._fusable_feed_forwards(layer):
                    expert.pack(kernels.blocked_weight)
        self.packed_output = repack(self.output.weight)
        self.decoder_stack = self._build_decoder_stack()
        return True

    def _next_norms(self) -> list[RMSNorm]:
        """The norm each layer's output feeds: the next layer's attention norm, or the final norm."""
        return [layer.attention_norm for layer in self.layers[1:]] + [self.norm]

    def _build_decoder_stack(self) -> DecoderStack | None:
        """All layers in one kernel call a step: where every layer is dense with fused weights, each
        repacked for the linear kernel."""
        kernels = self.cpu_kernels
        dense = all(isinstance(layer.feed_forward, FeedForward) and layer.feed_forward.fused_weight_current()
                    and layer.attention.fused_weight_current() for layer in self.layers)
        if kernels is None or not dense:
            return None
        layers, watched = [], []
        for layer, next_norm in zip(self.layers, self._next_norms()):
            attention, ffn = layer.attention, layer.feed_forward
            weights = [attention.packed.get("wqkv"), attention.packed.get("wo"), ffn.packed.get("w13"),
                       ffn.packed.get("w2")]
            if not all(isinstance(w, BlockedWeight) for w in weights):
                return None
            layers.append(StackLayer(*weights, layer.ffn_norm.weight, layer.ffn_norm.eps, next_norm.weight, next_norm.eps))
            # Every tensor the stack reads, or that the fused ones must still back.
            watched += [(attention.__dict__, "wqkv"), (ffn.__dict__, "w13")]
            watched += [(module._parameters, "weight") for module in (
                attention.wq, attention.wk, attention.wv, attention.wo, ffn.w1, ffn.w3, ffn.w2, layer.ffn_norm,
                next_norm)]
        attention = self.layers[0].attention
        return kernels.decoder_stack(layers, attention.n_heads, attention.n_kv_heads, attention.head_dim, watched)

    def use_cpu_kernels(self) -> bool:
        """forward_batch through the fused CPU kernels (cpu_kernels.py) from now on: bfloat16 models
        on CPU with fused q/k/v weights, where the kernels compile. False (nothing changed) elsewhere."""
        fused = all(layer.attention.wqkv is not None for layer in self.layers)
        if self.dtype != torch.bfloat16 or self.device.type != "cpu" or not fused:
            return False
        self.cpu_kernels = cpu_kernels.load()
        return self.cpu_kernels is not None

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Float32 logits of the normed hidden states ``h`` [M, dim].

        Unpacked, computed as weight @ h.T: for a few rows against a vocabulary-sized weight, MKL runs
        this orientation markedly faster than h @ weight.T, with the same dot products."""
        if self.packed_output is not None and self.packed_output.serves(self.output.weight):
            return self.packed_output(h).float()
        return torch.mm(self.output.weight, h.t()).t().float()

    def forward(
        self, tokens: torch.Tensor, start_pos: int = 0, cache: KVCache | None = None, last_only: bool = False
    ) -> torch.Tensor:
        """Float32 logits [T, vocab] (or [1, vocab] with ``last_only``) for ``tokens`` [T] at positions
        ``start_pos ..``. Prefill passes the prompt, decode one token; ``cache`` holds the earlier positions
        and receives the new ones. Without a cache the tokens are the whole sequence (``start_pos`` 0)."""
        n_tokens = tokens.shape[0]
        if n_tokens == 0:
            raise ValueError("forward needs at least one token")
        if cache is None:
            if start_pos != 0:
                raise ValueError(f"start_pos {start_pos} needs a KV cache holding the earlier positions")
            first_key = 0
        else:
            cache.check_write(start_pos, n_tokens)
            first_key = key_start(start_pos, self.args.sliding_window)
        if start_pos + n_tokens > self.args.max_position_embeddings:
            raise ValueError(
                f"positions up to {start_pos + n_tokens - 1} exceed max_position_embeddings "
                f"{self.args.max_position_embeddings}"
            )

        h = self.tok_embeddings(tokens)
        positions = torch.arange(start_pos, start_pos + n_tokens, device=tokens.device)
        cos, sin = rope_cos_sin(positions, self.args.head_dim, self.args.rope_theta, h.dtype)
        mask = attention_mask(start_pos, n_tokens, first_key, self.args.sliding_window, tokens.device)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, mask, start_pos, first_key, cache, i)
        if last_only:
            h = h[-1:]
        return self.logits(self.norm(h))
