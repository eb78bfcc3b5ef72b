"""`ModelSpec`: the one description of a Grok-family architecture.

It drives the PyTorch module (`gigafactory.model`), the parameter and FLOP counts below, the planner and the
server. No torch import here, so planning 100k GPUs stays light.

Conventions (used by every part of the project):
- ``params_total``: every trainable parameter, counting a tied embedding once.
- ``params_active``: parameters touched by one token: everything except the experts that are not routed to
  (``n_experts - top_k`` per layer). The input embedding counts (one row is read, but the matrix is "used").
- ``matmul_params_active``: the active parameters that take part in a matrix multiply per token: attention,
  router, routed experts, dense FFN and the output head. Not the input embedding lookup, not norm scales.
- ``flops_per_token`` (training, forward + backward) = 6 · matmul_params_active + 12 · n_layers · n_heads ·
  head_dim · seq_len. The second term is the attention score and value products (QKᵀ and AV, 2 FLOPs per
  multiply-add, ×3 for backward), counted for the full (non-causal) square as PaLM (Chowdhery et al. 2022,
  appendix B) and Megatron-LM do, so MFU figures compare with theirs.
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gigafactory.errors import UserError


def expert_ffn_size(widening: float, d_model: int) -> int:
    """Grok-1's rule: ``int(widening * d_model) * 2 // 3`` rounded up to a multiple of 8 (widening 8 → 32,768)."""
    size = int(widening * d_model) * 2 // 3
    return size + (-size) % 8


class ModelSpec(BaseModel):
    """Hyperparameters of a Grok-style mixture-of-experts transformer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "custom"
    d_model: int = Field(gt=0)
    n_layers: int = Field(gt=0)
    n_heads: int = Field(gt=0, description="query heads")
    n_kv_heads: int = Field(gt=0, description="key/value heads (grouped-query attention)")
    head_dim: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    max_seq_len: int = Field(gt=0, description="context length")
    n_experts: int = Field(gt=0)
    top_k: int = Field(gt=0)
    expert_ffn: int = Field(gt=0, description="hidden size of each gated-GELU expert")
    dense_ffn: int = Field(0, ge=0, description="hidden size of a dense FFN run beside the MoE (Grok-2); 0 = none")
    attn_softcap: float | None = Field(30.0, gt=0, description="attention logits become c·tanh(x/c)")
    router_softcap: float | None = Field(None, gt=0)
    final_softcap: float | None = Field(None, gt=0, description="soft-cap of the output logits")
    embedding_multiplier: float = Field(1.0, gt=0, description="input embeddings are scaled by this")
    output_multiplier: float = Field(1.0, gt=0, description="output logits are scaled by this")
    rope_theta: float = Field(10_000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    tie_embeddings: bool = True

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelSpec:
        if self.d_model % self.n_heads:
            raise ValueError(
                f"n_heads={self.n_heads} does not divide d_model={self.d_model}; pick heads that divide it"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k={self.top_k} exceeds n_experts={self.n_experts}; use top_k <= n_experts")
        if self.vocab_size < 260:
            raise ValueError(f"vocab_size={self.vocab_size} is below the 256 bytes plus special tokens; use >= 260")
        return self

    # ---- parameter counts ------------------------------------------------------------------------------
    @property
    def attn_params(self) -> int:
        """Per layer: Q and O projections (n_heads·head_dim) plus K and V (n_kv_heads·head_dim), no biases."""
        q = self.n_heads * self.head_dim
        kv = self.n_kv_heads * self.head_dim
        return self.d_model * (2 * q + 2 * kv)

    @property
    def expert_params(self) -> int:
        """One gated-GELU expert: gate, value (up) and down matrices."""
        return 3 * self.d_model * self.expert_ffn

    @property
    def dense_ffn_params(self) -> int:
        return 3 * self.d_model * self.dense_ffn

    @property
    def router_params(self) -> int:
        return self.d_model * self.n_experts

    @property
    def norm_params_per_layer(self) -> int:
        return 4 * self.d_model  # RMSNorm before and after attention and before and after the MoE

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.d_model

    @property
    def head_params(self) -> int:
        return 0 if self.tie_embeddings else self.vocab_size * self.d_model

    def layer_params(self, experts: int) -> int:
        return (
            self.attn_params
            + experts * self.expert_params
            + self.dense_ffn_params
            + self.router_params
            + self.norm_params_per_layer
        )

    @property
    def params_total(self) -> int:
        final_norm = self.d_model
        return (
            self.n_layers * self.layer_params(self.n_experts)
            + self.embedding_params
            + self.head_params
            + final_norm
        )

    @property
    def params_active(self) -> int:
        return self.params_total - self.n_layers * (self.n_experts - self.top_k) * self.expert_params

    @property
    def matmul_params_active(self) -> int:
        per_layer = self.attn_params + self.top_k * self.expert_params + self.dense_ffn_params + self.router_params
        return self.n_layers * per_layer + self.embedding_params  # the output head is vocab × d_model either way

    def attention_flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs of QKᵀ and AV per token, full square (see the module docstring)."""
        s = self.max_seq_len if seq_len is None else seq_len
        return 12 * self.n_layers * self.n_heads * self.head_dim * s

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward) at ``seq_len`` (default: the context length)."""
        return 6 * self.matmul_params_active + self.attention_flops_per_token(seq_len)

    def forward_flops_per_token(self, seq_len: int | None = None) -> int:
        return self.flops_per_token(seq_len) // 3

    def summary(self, seq_len: int | None = None) -> dict[str, Any]:
        return {
            "name": self.name,
            "params_total": self.params_total,
            "params_active": self.params_active,
            "flops_per_token": self.flops_per_token(seq_len),
            "seq_len": self.max_seq_len if seq_len is None else seq_len,
            "spec": self.model_dump(),
        }


# ---- presets ---------------------------------------------------------------------------------------------
# Grok-1 and Grok-2 follow the public xai-org/grok-1 release and the Grok-2 config (see ../shared/DESIGN.md).
PRESETS: dict[str, ModelSpec] = {
    "grok-1": ModelSpec(
        name="grok-1", d_model=6144, n_layers=64, n_heads=48, n_kv_heads=8, head_dim=128,
        vocab_size=131_072, max_seq_len=8192, n_experts=8, top_k=2, expert_ffn=expert_ffn_size(8, 6144),
        attn_softcap=30.0, embedding_multiplier=78.38367176906169, output_multiplier=0.5773502691896257,
        rope_theta=10_000.0, norm_eps=1e-5, tie_embeddings=True,
    ),
    "grok-2": ModelSpec(
        name="grok-2", d_model=8192, n_layers=64, n_heads=64, n_kv_heads=8, head_dim=128,
        vocab_size=131_072, max_seq_len=131_072, n_experts=8, top_k=2, expert_ffn=16_384, dense_ffn=32_768,
        attn_softcap=30.0, router_softcap=30.0, final_softcap=50.0, embedding_multiplier=90.50966799187809,
        output_multiplier=0.5, rope_theta=208_533_496.0, norm_eps=1e-5, tie_embeddings=False,
    ),
    # CPU-sized members of the family, same recipe (soft-caps, multipliers, four norms per layer).
    "tiny": ModelSpec(
        name="tiny", d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, vocab_size=1024,
        max_seq_len=128, n_experts=4, top_k=2, expert_ffn=512, embedding_multiplier=math.sqrt(128),
        output_multiplier=1 / math.sqrt(3),
    ),
    "small": ModelSpec(
        name="small", d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=32, vocab_size=2048,
        max_seq_len=256, n_experts=8, top_k=2, expert_ffn=1024, embedding_multiplier=16.0,
        output_multiplier=1 / math.sqrt(3),
    ),
}


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "spec"
    msg = first["msg"].removeprefix("Value error, ")
    return f"{where}: {msg}"


def spec_from_dict(data: dict[str, Any], source: str = "spec") -> ModelSpec:
    try:
        return ModelSpec(**data)
    except ValidationError as err:
        raise UserError(f"invalid model spec in {source}: {_one_line(err)}") from None
    except TypeError as err:
        raise UserError(f"invalid model spec in {source}: {err}") from None


def load_spec(name_or_path: str) -> ModelSpec:
    """A preset by name, or a user's spec from a .toml or .json file."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    path = Path(name_or_path)
    if path.suffix.lower() in {".toml", ".json"}:
        if not path.is_file():
            raise UserError(f"spec file {path} not found; give a preset ({', '.join(PRESETS)}) or an existing file")
        try:
            text = path.read_text(encoding="utf-8")
            data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"cannot parse spec file {path}: {err}") from None
        if not isinstance(data, dict):
            raise UserError(f"spec file {path} must hold a table/object of hyperparameters")
        data = data.get("model", data)
        data.setdefault("name", path.stem)
        return spec_from_dict(data, str(path))
    presets = ", ".join(PRESETS)
    raise UserError(f"unknown model {name_or_path!r}; choose a preset ({presets}) or a .toml/.json spec file")
