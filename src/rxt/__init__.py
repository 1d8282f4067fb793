"""rxt: Reactive Transformer (RxT) language models with Sparse Query Attention."""

from rxt.attention import ATTENTION_VARIANTS, Attention, KVCache, attention_flops, variant_heads
from rxt.config import PRESETS, ModelConfig
from rxt.model import ReactiveTransformer, StatelessLM, load_model

__all__ = [
    "ATTENTION_VARIANTS",
    "Attention",
    "KVCache",
    "ModelConfig",
    "PRESETS",
    "ReactiveTransformer",
    "StatelessLM",
    "attention_flops",
    "load_model",
    "variant_heads",
]
__version__ = "0.1.0"
