"""The single-device Grok-style model built from a `ModelSpec`, and generation helpers."""

from gigafactory.model.grok import PAD_ID, GrokModel, KVCache, KVCacheLike, MoE

__all__ = ["PAD_ID", "GrokModel", "KVCache", "KVCacheLike", "MoE"]
