"""An independent numpy reference of the original Grok-1 forward pass (public xai-org/grok-1 model.py), written
from the release's semantics on the release's own parameter names and layouts, sharing no code with
`gigafactory.model`. It computes in float32 where the original runs activations in bfloat16.

What it follows from model.py: inputs `embeddings[tokens] * embedding_multiplier_scale`; per decoder layer
`h += rms_norm_1(attn(rms_norm(h)))` and `h += rms_norm_3(moe(rms_norm_2(h)))`; attention with Haiku
[in, out] weights, heads split as [..., heads, key_size], RoPE over the whole key size with the half-split
("rotate_half") rule and base 10,000, grouped queries reshaped to [kv_heads, q_per_kv], logits times
`attn_output_multiplier` then `30 * tanh(x / 30)`, masked with -1e30 (causal and `tokens > pad`), softmax in
fp32; the router `softmax(x @ w)` in fp32 over all experts, top-k probabilities as gates (not renormalised);
each expert `linear_1(gelu_tanh(linear(x)) * linear_v(x))`; 8-bit weights as `weight * scales` (scales
broadcast over groups of contracting rows, the product rounded to bfloat16 as the original's bf16 multiply);
final `rms_norm`, logits `h @ embeddings.T * output_multiplier`.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np


def _weight(p) -> np.ndarray:
    if hasattr(p, "scales"):
        w, s = p.weight.astype(np.float32), p.scales.astype(np.float32)
        k, g = w.shape[-2], s.shape[-2]
        # model.py: `w.astype(scales.dtype) * scales`, a bfloat16 product
        return (np.repeat(s, k // g, axis=-2) * w).astype(ml_dtypes.bfloat16).astype(np.float32)
    return np.asarray(p, dtype=np.float32)


def _rms_norm(x: np.ndarray, scale: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale.astype(np.float32)


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _rope(x: np.ndarray, base: float = 10_000.0) -> np.ndarray:
    """x: [B, T, H, D], positions 0..T-1."""
    d = x.shape[-1]
    inv_freq = 1.0 / (base ** (np.arange(0, d, 2, dtype=np.float32) / d))
    phase = np.arange(x.shape[1], dtype=np.float32)[:, None] * inv_freq[None, :]
    phase = np.concatenate([phase, phase], axis=-1)[None, :, None, :]
    x1, x2 = np.split(x, 2, axis=-1)
    return x * np.cos(phase) + np.concatenate([-x2, x1], axis=-1) * np.sin(phase)


def _attention(x, params, prefix, n_heads, n_kv, key_size, mask, multiplier):
    b, t, _ = x.shape
    q = (x @ _weight(params[f"{prefix}/query/w"])).reshape(b, t, n_heads, key_size)
    k = (x @ _weight(params[f"{prefix}/key/w"])).reshape(b, t, n_kv, key_size)
    v = (x @ _weight(params[f"{prefix}/value/w"])).reshape(b, t, n_kv, key_size)
    q, k = _rope(q), _rope(k)
    q = q.reshape(b, t, n_kv, n_heads // n_kv, key_size)
    logits = np.einsum("bthgd,bshd->bhgts", q, k) * multiplier
    logits = 30.0 * np.tanh(logits / 30.0)
    logits = np.where(mask[:, None, None], logits, -1e30)
    logits = logits - logits.max(-1, keepdims=True)
    w = np.exp(logits)
    w = w / w.sum(-1, keepdims=True)
    out = np.einsum("bhgts,bshd->bthgd", w, v).reshape(b, t, n_heads * key_size)
    return out @ _weight(params[f"{prefix}/linear/w"])


def _moe(x, params, prefix, top_k):
    b, t, d = x.shape
    flat = x.reshape(-1, d)
    logits = flat @ np.asarray(params[f"{prefix}/router/w"], np.float32)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs = probs / probs.sum(-1, keepdims=True)
    chosen = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
    gate_w = _weight(params[f"{prefix}/moe/linear/w"])  # [E, d, F]
    value_w = _weight(params[f"{prefix}/moe/linear_v/w"])
    down_w = _weight(params[f"{prefix}/moe/linear_1/w"])  # [E, F, d]
    out = np.zeros_like(flat)
    for n in range(flat.shape[0]):
        for e in chosen[n]:
            h = _gelu_tanh(flat[n] @ gate_w[e]) * (flat[n] @ value_w[e])
            out[n] += probs[n, e] * (h @ down_w[e])
    return out.reshape(b, t, d)


def reference_logits(params, spec, tokens: np.ndarray, pad_token: int = 0) -> np.ndarray:
    """Logits [B, T, V] of the original Grok-1 computation for integer tokens [B, T]."""
    emb = np.asarray(params["language_model/in_out_embed/embeddings"], np.float32)
    h = emb[tokens] * spec.embedding_multiplier
    t = tokens.shape[1]
    mask = np.tril(np.ones((t, t), dtype=bool))[None] & (tokens > pad_token)[:, None, :]
    multiplier = 1.0 / math.sqrt(spec.head_dim)
    for i in range(spec.n_layers):
        p = f"transformer/decoder_layer_{i}"
        a = _attention(_rms_norm(h, params[f"{p}/rms_norm/scale"]), params, f"{p}/multi_head_attention",
                       spec.n_heads, spec.n_kv_heads, spec.head_dim, mask, multiplier)
        h = h + _rms_norm(a, params[f"{p}/rms_norm_1/scale"])
        m = _moe(_rms_norm(h, params[f"{p}/rms_norm_2/scale"]), params, p, spec.top_k)
        h = h + _rms_norm(m, params[f"{p}/rms_norm_3/scale"])
    h = _rms_norm(h, params["language_model/rms_norm/scale"])
    return (h @ emb.T) * spec.output_multiplier
