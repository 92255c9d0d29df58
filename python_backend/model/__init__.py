"""PyTorch implementation of the Mistral family (Mistral, Mixtral, Llama) for CPU/GPU inference."""
from .args import ModelArgs, MoeArgs
from .batch import Segment, SlotKVCache
from .cache import KVCache
from .transformer import Transformer
from .weights import load_model, read_args

__all__ = ["KVCache", "ModelArgs", "MoeArgs", "Segment", "SlotKVCache", "Transformer", "load_model", "read_args"]
