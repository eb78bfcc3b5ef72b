"""Descriptions shared by every part of the project (no torch import): models, hardware, layouts."""

from gigafactory.specs.model_spec import PRESETS, ModelSpec, expert_ffn_size, load_spec

__all__ = ["PRESETS", "ModelSpec", "expert_ffn_size", "load_spec"]
