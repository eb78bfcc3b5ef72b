"""Hugging Face layout, both ways: sharded safetensors + ``model.safetensors.index.json`` + ``config.json`` +
tokenizer files, under the names and config keys of the public Grok ports.

Tensor names (PyTorch ``nn.Linear`` layout, [out, in]) are those of the Grok-1 Hugging Face port
(hpcai-tech/grok-1, keyfan/grok-1-hf) that vLLM's and SGLang's ``grok1`` models load:
``model.embed_tokens.weight``, ``model.layers.N.attn.{q,k,v,o}_proj.weight``,
``model.layers.N.moe_block.gate.weight``, ``model.layers.N.moe_block.experts.E.{linear,linear_v,linear_1}.weight``
(gate, value and down projections of expert E), ``model.layers.N.{pre,post}_{attn,moe}_norm.weight``,
``model.norm.weight``, and ``lm_head.weight`` when embeddings are untied. Grok-2's dense FFN beside the MoE
(``residual_moe``) is ``model.layers.N.mlp.{gate_proj,up_proj,down_proj}.weight``.

Config keys: the Grok-1 port's (``hidden_size``, ``intermediate_size``, ``num_experts``,
``num_experts_per_tok``, ``embedding_multiplier_scale``, ``output_multiplier_scale``,
``attn_output_multiplier``, ``max_attn_value``, ...) plus Grok-2's (``head_dim``, ``residual_moe``,
``moe_intermediate_size``, ``attn_logit_softcapping``, ``router_logit_softcapping``,
``final_logit_softcapping``, ``rope_theta``). Tensors keep the run's dtype, so export then import is bitwise.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gigafactory.errors import UserError
from gigafactory.specs.model_spec import ModelSpec, spec_from_dict
from gigafactory.util import atomic_write_text

INDEX = "model.safetensors.index.json"
# this project's per-layer name -> HF per-layer name (matrices are both [out, in])
_LAYER = {
    "attn.q_proj.weight": "attn.q_proj.weight",
    "attn.k_proj.weight": "attn.k_proj.weight",
    "attn.v_proj.weight": "attn.v_proj.weight",
    "attn.o_proj.weight": "attn.o_proj.weight",
    "moe.router.weight": "moe_block.gate.weight",
    "pre_attn_norm.weight": "pre_attn_norm.weight",
    "post_attn_norm.weight": "post_attn_norm.weight",
    "pre_moe_norm.weight": "pre_moe_norm.weight",
    "post_moe_norm.weight": "post_moe_norm.weight",
    "dense.gate.weight": "mlp.gate_proj.weight",
    "dense.up.weight": "mlp.up_proj.weight",
    "dense.down.weight": "mlp.down_proj.weight",
}
# stacked experts [E, in, out] -> per-expert HF Linear [out, in]
_EXPERTS = {"moe.experts.w_gate": "linear", "moe.experts.w_up": "linear_v", "moe.experts.w_down": "linear_1"}
_TOP = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


# ---- config ----------------------------------------------------------------------------------------------
def hf_config(spec: ModelSpec, dtype: torch.dtype) -> dict[str, Any]:
    residual = spec.dense_ffn > 0
    return {
        "architectures": ["Grok1ForCausalLM" if residual else "Grok1ModelForCausalLM"],
        "model_type": "grok-1",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.d_model,
        "num_hidden_layers": spec.n_layers,
        "num_attention_heads": spec.n_heads,
        "num_key_value_heads": spec.n_kv_heads,
        "head_dim": spec.head_dim,
        "intermediate_size": spec.dense_ffn if residual else spec.expert_ffn,
        "moe_intermediate_size": spec.expert_ffn,
        "residual_moe": residual,
        "num_experts": spec.n_experts,
        "num_local_experts": spec.n_experts,
        "num_experts_per_tok": spec.top_k,
        "max_position_embeddings": spec.max_seq_len,
        "rms_norm_eps": spec.norm_eps,
        "rope_theta": spec.rope_theta,
        "embedding_multiplier_scale": spec.embedding_multiplier,
        "output_multiplier_scale": spec.output_multiplier,
        "attn_output_multiplier": 1 / math.sqrt(spec.head_dim),
        "max_attn_value": spec.attn_softcap,
        "attn_logit_softcapping": spec.attn_softcap,
        "router_logit_softcapping": spec.router_softcap,
        "final_logit_softcapping": spec.final_softcap,
        "tie_word_embeddings": spec.tie_embeddings,
        "pad_token_id": 0,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "gigafactory_name": spec.name,
    }


def _number(cfg: dict[str, Any], key: str, default: Any = None) -> Any:
    if key not in cfg:
        if default is None:
            raise UserError(f"config.json lacks {key!r}; is this a Grok-family Hugging Face folder?")
        return default
    return cfg[key]


def spec_from_hf(cfg: dict[str, Any]) -> ModelSpec:
    """The `ModelSpec` a Grok-1/Grok-2 style ``config.json`` describes."""
    residual = bool(cfg.get("residual_moe", False))
    d, heads = _number(cfg, "hidden_size"), _number(cfg, "num_attention_heads")
    expert_ffn = cfg.get("moe_intermediate_size") if residual else cfg.get("intermediate_size")
    attn_cap = cfg.get("attn_logit_softcapping", cfg.get("max_attn_value", 30.0))
    return spec_from_dict(
        {
            "name": cfg.get("gigafactory_name", "hf-import"),
            "d_model": d,
            "n_layers": _number(cfg, "num_hidden_layers"),
            "n_heads": heads,
            "n_kv_heads": cfg.get("num_key_value_heads", heads),
            "head_dim": cfg.get("head_dim") or d // heads,
            "vocab_size": _number(cfg, "vocab_size"),
            "max_seq_len": _number(cfg, "max_position_embeddings"),
            "n_experts": cfg.get("num_experts", cfg.get("num_local_experts", 8)),
            "top_k": _number(cfg, "num_experts_per_tok"),
            "expert_ffn": expert_ffn or _number(cfg, "intermediate_size"),
            "dense_ffn": _number(cfg, "intermediate_size") if residual else 0,
            "attn_softcap": attn_cap or None,
            "router_softcap": cfg.get("router_logit_softcapping") or None,
            "final_softcap": cfg.get("final_logit_softcapping") or None,
            "embedding_multiplier": cfg.get("embedding_multiplier_scale", 1.0),
            "output_multiplier": cfg.get("output_multiplier_scale", 1.0),
            "rope_theta": cfg.get("rope_theta", 10_000.0),
            "norm_eps": cfg.get("rms_norm_eps", 1e-5),
            "tie_embeddings": cfg.get("tie_word_embeddings", True),
        },
        "config.json",
    )


# ---- names -----------------------------------------------------------------------------------------------
def to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This project's state dict -> HF names and layouts (views; experts split per expert)."""
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if key in _TOP:
            out[_TOP[key]] = t
            continue
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
        if m is None:
            raise UserError(f"unexpected parameter {key!r} in the model")
        layer, rest = m.groups()
        if rest in _EXPERTS:
            for e in range(t.shape[0]):
                out[f"model.layers.{layer}.moe_block.experts.{e}.{_EXPERTS[rest]}.weight"] = t[e].t()
        else:
            out[f"model.layers.{layer}.{_LAYER[rest]}"] = t
    return out


def from_hf_name(name: str) -> tuple[str, int | None]:
    """HF name -> (this project's key, expert index or None)."""
    for ours, hf in _TOP.items():
        if name == hf:
            return ours, None
    m = re.fullmatch(r"model\.layers\.(\d+)\.moe_block\.experts\.(\d+)\.(linear|linear_v|linear_1)\.weight", name)
    if m:
        layer, expert, kind = m.groups()
        ours = {v: k for k, v in _EXPERTS.items()}[kind]
        return f"layers.{int(layer)}.{ours}", int(expert)
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if m:
        back = {v: k for k, v in _LAYER.items()}
        if m.group(2) in back:
            return f"layers.{int(m.group(1))}.{back[m.group(2)]}", None
    raise UserError(f"unknown tensor {name!r} in the checkpoint; this importer reads the Grok-1/Grok-2 HF names")


# ---- export ----------------------------------------------------------------------------------------------
def export(run_dir: Path, out: Path, shard_mb: float = 2000.0) -> list[Path]:
    """A run's newest checkpoint -> HF folder. Returns the shard paths."""
    from gigafactory.runs import load_for_inference
    from gigafactory.tokenizer import copy_tokenizer

    model, _, step = load_for_inference(Path(run_dir), quiet=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = to_hf(model.state_dict())
    dtype = next(iter(tensors.values())).dtype
    shards: list[dict[str, torch.Tensor]] = [{}]
    size, limit = 0, int(shard_mb * 2**20)
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    paths, weight_map = [], {}
    for i, shard in enumerate(shards):
        path = out / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file(shard, str(tmp), metadata={"format": "pt"})
        tmp.rename(path)
        paths.append(path)
        weight_map.update({name: path.name for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total, "gigafactory_step": step}, "weight_map": weight_map}
    atomic_write_text(out / INDEX, json.dumps(index, indent=1))
    atomic_write_text(out / "config.json", json.dumps(hf_config(model.spec, dtype), indent=1))
    copied = copy_tokenizer(Path(run_dir), out)
    tok_cfg = {"model_max_length": model.spec.max_seq_len, "pad_token": "[PAD]" if "tokenizer.model" in copied
               else "<pad>", "eos_token": "[EOS]" if "tokenizer.model" in copied else "<eos>"}
    atomic_write_text(out / "tokenizer_config.json", json.dumps(tok_cfg, indent=1))
    return paths


# ---- import ----------------------------------------------------------------------------------------------
def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"{folder} has no config.json; pass a Hugging Face model folder")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"cannot parse {path}: {err}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path} must hold a JSON object")
    return cfg


def _shard_files(folder: Path) -> list[Path]:
    index = folder / INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise UserError(f"cannot read {index}: {err}") from None
        files = [folder / n for n in names]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder} holds no .safetensors files")
    for f in files:
        if f.parent != folder or not f.is_file():
            raise UserError(f"the index names {f.name}, which is not a file in {folder}")
    return files


def load_hf(folder: Path):
    """HF folder -> (`GrokModel`, spec). Tensors are read one at a time from memory-mapped shards."""
    from gigafactory.interop.grok1 import new_model

    folder = Path(folder)
    spec = spec_from_hf(_read_config(folder))
    model = new_model(spec)
    state = model.state_dict()
    seen: dict[str, set[int | None]] = {k: set() for k in state}
    for path in _shard_files(folder):
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as err:  # safetensors raises its own error types for damaged headers
            raise UserError(f"cannot read {path}: {err}") from None
        with handle as f, torch.no_grad():
            for name in f.keys():
                ours, expert = from_hf_name(name)
                if ours not in state:
                    raise UserError(f"{name} does not fit the spec in config.json (no {ours})")
                t = f.get_tensor(name)
                target = state[ours] if expert is None else state[ours][expert].t()
                if tuple(t.shape) != tuple(target.shape):
                    raise UserError(f"{name} has shape {tuple(t.shape)}; config.json implies {tuple(target.shape)}")
                target.copy_(t)
                seen[ours].add(expert)
    need = {k: ({None} if not re.search(r"experts\.w_", k) else set(range(spec.n_experts))) for k in state}
    missing = [k for k in state if seen[k] != need[k]]
    if missing:
        raise UserError(f"the checkpoint lacks {missing[0]} ({len(missing)} tensors incomplete); is it complete?")
    return model.eval(), spec
