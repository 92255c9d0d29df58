"""How a TensorRT-LLM checkpoint is split over GPUs: tensor, pipeline and MoE parallelism.

Same rank arithmetic as TensorRT-LLM's `tensorrt_llm/mapping.py`:
  tp_rank = rank % tp_size          pp_rank = rank // tp_size
  moe_ep_rank = tp_rank % moe_ep_size
  moe_tp_rank = tp_rank // moe_ep_size
A pipeline stage holds a contiguous run of layers (`torch.tensor_split` of the layer range: the
first stages get the extra layers); an expert-parallel rank holds a contiguous run of experts.
"""
from __future__ import annotations

from dataclasses import dataclass


class MappingError(ValueError):
    pass


@dataclass(frozen=True)
class RankPosition:
    """Where one rank (one GPU) sits in the mapping."""

    rank: int
    tp_rank: int
    pp_rank: int
    moe_tp_rank: int
    moe_ep_rank: int


@dataclass(frozen=True)
class Mapping:
    tp_size: int = 1
    pp_size: int = 1
    moe_tp_size: int = 1
    moe_ep_size: int = 1

    def __post_init__(self) -> None:
        for field in ("tp_size", "pp_size", "moe_tp_size", "moe_ep_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MappingError(f"{field} must be a positive integer, got {value!r}")
        if self.moe_tp_size * self.moe_ep_size != self.tp_size:
            raise MappingError(
                f"moe_tp_size ({self.moe_tp_size}) x moe_ep_size ({self.moe_ep_size}) = "
                f"{self.moe_tp_size * self.moe_ep_size} must equal tp_size ({self.tp_size}): the MoE "
                "layers are split over the same GPUs as the rest of the model"
            )

    @classmethod
    def create(
        cls, tp: int = 1, pp: int = 1, moe_tp: int | None = None, moe_ep: int | None = None
    ) -> Mapping:
        """Fill the MoE sizes the way TensorRT-LLM does: neither given -> MoE tensor parallelism over
        all tp ranks; one given -> the other is tp divided by it."""
        for name, value in (("tp", tp), ("pp", pp), ("moe_tp", moe_tp), ("moe_ep", moe_ep)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise MappingError(f"{name} must be a positive integer, got {value!r}")
        if moe_tp is None and moe_ep is None:
            moe_tp, moe_ep = tp, 1
        elif moe_tp is None:
            if tp % moe_ep:
                raise MappingError(f"moe_ep_size ({moe_ep}) must divide tp_size ({tp})")
            moe_tp = tp // moe_ep
        elif moe_ep is None:
            if tp % moe_tp:
                raise MappingError(f"moe_tp_size ({moe_tp}) must divide tp_size ({tp})")
            moe_ep = tp // moe_tp
        return cls(tp_size=tp, pp_size=pp, moe_tp_size=moe_tp, moe_ep_size=moe_ep)

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    def position(self, rank: int) -> RankPosition:
        if not 0 <= rank < self.world_size:
            raise MappingError(f"rank {rank} is outside 0..{self.world_size - 1}")
        tp_rank = rank % self.tp_size
        return RankPosition(
            rank=rank,
            tp_rank=tp_rank,
            pp_rank=rank // self.tp_size,
            moe_tp_rank=tp_rank // self.moe_ep_size,
            moe_ep_rank=tp_rank % self.moe_ep_size,
        )

    def pp_layers(self, num_layers: int, pp_rank: int) -> list[int]:
        """Global indices of the layers pipeline stage `pp_rank` holds."""
        base, extra = divmod(num_layers, self.pp_size)
        start = pp_rank * base + min(pp_rank, extra)
        return list(range(start, start + base + (pp_rank < extra)))

    def ep_experts(self, num_experts: int, moe_ep_rank: int) -> list[int]:
        """Global indices of the experts expert-parallel rank `moe_ep_rank` holds."""
        per_rank = num_experts // self.moe_ep_size
        return list(range(moe_ep_rank * per_rank, (moe_ep_rank + 1) * per_rank))

    def check_model(
        self,
        *,
        num_layers: int,
        num_heads: int,
        num_kv_heads: int,
        intermediate_size: int,
        num_experts: int = 0,
        architecture: str = "the model",
    ) -> None:
        """Raise MappingError when the model cannot be split this way."""
        tp = self.tp_size
        if self.pp_size > num_layers:
            raise MappingError(f"pp_size ({self.pp_size}) exceeds the {num_layers} layers of {architecture}")
        if num_heads % tp:
            raise MappingError(f"tp_size ({tp}) does not divide num_attention_heads ({num_heads}) of {architecture}")
        if num_kv_heads >= tp and num_kv_heads % tp:
            raise MappingError(
                f"tp_size ({tp}) does not divide num_key_value_heads ({num_kv_heads}) of {architecture}"
            )
        if num_kv_heads < tp and tp % num_kv_heads:
            raise MappingError(
                f"tp_size ({tp}) must be a multiple of num_key_value_heads ({num_kv_heads}) of {architecture}: "
                "with fewer KV heads than ranks each KV head is copied to tp / num_key_value_heads ranks"
            )
        if num_experts:
            if num_experts % self.moe_ep_size:
                raise MappingError(
                    f"moe_ep_size ({self.moe_ep_size}) does not divide the {num_experts} experts of {architecture}"
                )
            if intermediate_size % self.moe_tp_size:
                raise MappingError(
                    f"moe_tp_size ({self.moe_tp_size}) does not divide intermediate_size ({intermediate_size}) "
                    f"of {architecture}"
                )
        else:
            if self.moe_ep_size != 1:
                raise MappingError(f"moe_ep_size applies to mixture-of-experts models; {architecture} has no experts")
            if intermediate_size % tp:
                raise MappingError(
                    f"tp_size ({tp}) does not divide intermediate_size ({intermediate_size}) of {architecture}"
                )

    def to_config(self) -> dict[str, int]:
        """The `mapping` block of a TensorRT-LLM checkpoint's config.json."""
        return {
            "world_size": self.world_size,
            "tp_size": self.tp_size,
            "pp_size": self.pp_size,
            "moe_tp_size": self.moe_tp_size,
            "moe_ep_size": self.moe_ep_size,
        }

    @classmethod
    def from_config(cls, config: dict) -> Mapping:
        """Read a checkpoint's `mapping` block (older checkpoints may lack the MoE sizes)."""
        if not isinstance(config, dict):
            raise MappingError(f"mapping must be an object, got {config!r}")
        tp, pp = config.get("tp_size", 1), config.get("pp_size", 1)
        moe_tp, moe_ep = config.get("moe_tp_size"), config.get("moe_ep_size")
        # TensorRT-LLM writes -1 for "not set".
        mapping = cls.create(tp, pp, None if moe_tp in (None, -1) else moe_tp, None if moe_ep in (None, -1) else moe_ep)
        world = config.get("world_size", mapping.world_size)
        if world != mapping.world_size:
            raise MappingError(f"world_size ({world}) is not tp_size x pp_size ({tp} x {pp})")
        return mapping

    def describe(self, moe: bool = False) -> str:
        text = f"world size {self.world_size}: tp {self.tp_size}, pp {self.pp_size}"
        if moe and self.tp_size > 1:
            text += f" (MoE: moe_tp {self.moe_tp_size} x moe_ep {self.moe_ep_size})"
        return text
