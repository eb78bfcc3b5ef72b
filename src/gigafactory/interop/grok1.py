"""The released Grok-1 checkpoint format (public xai-org/grok-1: checkpoint.py, model.py, run.py).

Facts of the format, as the release's code reads it:

- ``ckpt-0/`` holds one file per parameter, ``tensor{i:05d}_{host:03d}`` (one host: ``_000``), where ``i`` is
  the parameter's position in the flattened parameter tree. The tree is ``TrainingState(params=...)`` with
  Haiku's two-level dict ``{module path: {parameter name: array}}``; JAX flattens dicts in sorted key order,
  so the order is sorted by module path, then parameter name (``decoder_layer_10`` sorts before
  ``decoder_layer_2``). Grok-1 has 2 + 12 x 64 = 770 files.
- Each file is a pickle (protocol 4) of a numpy array (embeddings, norm scales, router: float32) or of a
  ``__main__.QuantizedWeight8bit`` record with fields ``weight`` (int8, same shape as the parameter) and
  ``scales`` (bfloat16, the parameter's shape with the contracting axis reduced to ``G`` groups; ``G`` was the
  number of tensor-parallel shards of that axis when the release was written: 1 or 8). The original code
  dequantises as ``weight.astype(bf16) * scales`` with the scales broadcast over each group of rows.
- Parameter names and layouts (Haiku ``Linear`` weights are ``[in, out]``; MoE weights are stacked experts
  ``[E, in, out]``) are in `original_names` and docs/interop.md.

Reading: pickle runs code, so `read_tensor` uses an unpickler that resolves only the handful of globals
the format needs (numpy's array reconstructor, ``ndarray``, ``dtype``, ml_dtypes' ``bfloat16`` and the 8-bit
record) and refuses anything else; the result must be arrays of the expected dtypes.
"""

from __future__ import annotations

import io
import math
import pickle
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import torch

from gigafactory.errors import UserError
from gigafactory.specs.model_spec import ModelSpec

BF16 = np.dtype(ml_dtypes.bfloat16)
PLAIN_DTYPES = {np.dtype(np.float32), BF16, np.dtype(np.float16)}
SCALE_DTYPES = {BF16, np.dtype(np.float32)}
# Layer-local parameters, in the release's tree order (sorted module path, then parameter name).
LAYER_PARAMS = (
    "moe/linear/w",
    "moe/linear_1/w",
    "moe/linear_v/w",
    "multi_head_attention/key/w",
    "multi_head_attention/linear/w",
    "multi_head_attention/query/w",
    "multi_head_attention/value/w",
    "rms_norm/scale",
    "rms_norm_1/scale",
    "rms_norm_2/scale",
    "rms_norm_3/scale",
    "router/w",
)
EMBED = "language_model/in_out_embed/embeddings"
FINAL_NORM = "language_model/rms_norm/scale"
# The release's Haiku name (within a decoder layer) -> this project's parameter name, and whether the tensor
# is a Haiku Linear [in, out] that PyTorch stores transposed ([out, in]).
TO_OURS: dict[str, tuple[str, bool]] = {
    "multi_head_attention/query/w": ("attn.q_proj.weight", True),
    "multi_head_attention/key/w": ("attn.k_proj.weight", True),
    "multi_head_attention/value/w": ("attn.v_proj.weight", True),
    "multi_head_attention/linear/w": ("attn.o_proj.weight", True),
    "router/w": ("moe.router.weight", True),
    "moe/linear/w": ("moe.experts.w_gate", False),  # [E, d, F]: the GELU-gated branch
    "moe/linear_v/w": ("moe.experts.w_up", False),  # [E, d, F]: the value branch
    "moe/linear_1/w": ("moe.experts.w_down", False),  # [E, F, d]
    "rms_norm/scale": ("pre_attn_norm.weight", False),
    "rms_norm_1/scale": ("post_attn_norm.weight", False),
    "rms_norm_2/scale": ("pre_moe_norm.weight", False),
    "rms_norm_3/scale": ("post_moe_norm.weight", False),
}
QUANTIZED = {k for k in LAYER_PARAMS if k.startswith(("moe/", "multi_head_attention/"))}
# Tensor-parallel groups of the contracting axis in the release's scales: the weights whose input axis was
# sharded over the 8-way "model" mesh axis (attention output, expert down projection).
RELEASE_SCALE_GROUPS = {"multi_head_attention/linear/w": 8, "moe/linear_1/w": 8}


@dataclass
class QuantizedWeight8bit:
    """The release's 8-bit weight record: int8 ``weight`` and ``scales`` grouped along the contracting axis."""

    weight: np.ndarray
    scales: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return self.weight.shape


# ---- names and shapes -------------------------------------------------------------------------------------
def check_grok1_shaped(spec: ModelSpec) -> None:
    """The release format has names only for Grok-1's architecture."""
    problems = []
    if spec.dense_ffn:
        problems.append("a dense FFN beside the MoE")
    if not spec.tie_embeddings:
        problems.append("untied embeddings")
    if spec.router_softcap is not None or spec.final_softcap is not None:
        problems.append("router or final-logit soft-caps")
    if spec.attn_softcap != 30.0:
        problems.append(f"attention soft-cap {spec.attn_softcap} (the release hard-codes 30)")
    if spec.rope_theta != 10_000.0:
        problems.append(f"RoPE base {spec.rope_theta} (the release hard-codes 10,000)")
    if problems:
        raise UserError(
            f"spec {spec.name!r} is not Grok-1-shaped ({', '.join(problems)}); the Grok-1 release format cannot hold "
            "it: use `gigafactory export --format hf` instead"
        )


def original_names(spec: ModelSpec) -> list[str]:
    """Every parameter's release name, in the release's flattened-tree (file index) order."""
    check_grok1_shaped(spec)
    keys = [tuple(EMBED.rsplit("/", 1)), tuple(FINAL_NORM.rsplit("/", 1))]
    for i in range(spec.n_layers):
        for local in LAYER_PARAMS:
            module, param = f"transformer/decoder_layer_{i}/{local}".rsplit("/", 1)
            keys.append((module, param))
    return ["/".join(k) for k in sorted(keys)]


def original_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    d, e, f = spec.d_model, spec.n_experts, spec.expert_ffn
    q, kv = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    local = {
        "moe/linear/w": (e, d, f),
        "moe/linear_1/w": (e, f, d),
        "moe/linear_v/w": (e, d, f),
        "multi_head_attention/key/w": (d, kv),
        "multi_head_attention/linear/w": (q, d),
        "multi_head_attention/query/w": (d, q),
        "multi_head_attention/value/w": (d, kv),
        "router/w": (d, e),
    }
    shapes: dict[str, tuple[int, ...]] = {EMBED: (spec.vocab_size, d), FINAL_NORM: (d,)}
    for name in original_names(spec):
        if name.startswith("transformer/"):
            rest = name.split("/", 2)[2]
            shapes[name] = local.get(rest, (d,))
    return shapes


def our_name(original: str) -> tuple[str, bool]:
    """(this project's state-dict key, transpose?) for a release name."""
    if original == EMBED:
        return "embed.weight", False
    if original == FINAL_NORM:
        return "norm.weight", False
    parts = original.split("/", 2)
    if len(parts) == 3 and parts[0] == "transformer" and parts[1].startswith("decoder_layer_"):
        layer = parts[1].removeprefix("decoder_layer_")
        if layer.isdigit() and parts[2] in TO_OURS:
            ours, transpose = TO_OURS[parts[2]]
            return f"layers.{int(layer)}.{ours}", transpose
    raise UserError(f"{original!r} is not a Grok-1 parameter name (see docs/interop.md for the mapping)")


# ---- 8-bit weights ----------------------------------------------------------------------------------------
def dequantize(q: QuantizedWeight8bit) -> np.ndarray:
    """float32 values of ``weight * scales`` rounded to bfloat16, as the original code computes them."""
    w, s = q.weight, q.scales
    *lead, k, n = w.shape
    groups = s.shape[-2]
    if s.shape[:-2] != tuple(lead) or s.shape[-1] != n or groups == 0 or k % groups:
        raise UserError(f"8-bit weight {w.shape} has scales {s.shape}; expected (..., G, {n}) with G dividing {k}")
    grouped = w.reshape(*lead, groups, k // groups, n).astype(np.float32)
    out = grouped * s.astype(np.float32)[..., :, None, :]
    return out.astype(BF16).astype(np.float32).reshape(w.shape)


def quantize(w: np.ndarray, groups: int = 1) -> QuantizedWeight8bit:
    """Symmetric per-output-channel int8 (per group of contracting rows): scale = max|w| / 127, in bf16."""
    *lead, k, n = w.shape
    grouped = np.asarray(w, np.float32).reshape(*lead, groups, k // groups, n)
    scales = (np.abs(grouped).max(axis=-2) / 127.0).astype(BF16)
    safe = np.where(scales.astype(np.float32) == 0, 1.0, scales.astype(np.float32))
    q = np.clip(np.rint(grouped / safe[..., :, None, :]), -127, 127).astype(np.int8)
    return QuantizedWeight8bit(q.reshape(w.shape), scales)


# ---- reading ----------------------------------------------------------------------------------------------
def _reconstruct() -> Any:
    from numpy._core.multiarray import _reconstruct as fn

    return fn


_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct(),
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct(),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("ml_dtypes", "bfloat16"): ml_dtypes.bfloat16,
    ("ml_dtypes._ml_dtypes_ext", "bfloat16"): ml_dtypes.bfloat16,
    ("__main__", "QuantizedWeight8bit"): QuantizedWeight8bit,
    ("model", "QuantizedWeight8bit"): QuantizedWeight8bit,
}


class RefusedPickle(Exception):
    pass


class _AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is None:
            raise RefusedPickle(f"it references {module}.{name}, which is not one of the classes the format uses")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise RefusedPickle("it uses persistent ids, which the format never does")


def _check_array(a: Any, allowed: set[np.dtype], what: str) -> np.ndarray:
    if type(a) is not np.ndarray:
        raise RefusedPickle(f"{what} is a {type(a).__name__}, not a numpy array")
    if a.dtype not in allowed:
        raise RefusedPickle(f"{what} has dtype {a.dtype}; expected one of {sorted(str(d) for d in allowed)}")
    return a


def read_tensor(path: Path) -> np.ndarray | QuantizedWeight8bit:
    """One release tensor file: a float array or an 8-bit record. Anything else is refused (UserError)."""
    try:
        with open(path, "rb") as f:
            obj = _AllowListUnpickler(f).load()
        if isinstance(obj, QuantizedWeight8bit):
            if set(vars(obj)) != {"weight", "scales"}:
                raise RefusedPickle(f"its 8-bit record has fields {sorted(vars(obj))}, not weight and scales")
            _check_array(obj.weight, {np.dtype(np.int8)}, "the 8-bit weight")
            _check_array(obj.scales, SCALE_DTYPES, "the scales")
            return obj
        return _check_array(obj, PLAIN_DTYPES, "the tensor")
    except RefusedPickle as err:
        raise UserError(f"refusing {path}: {err}; is this a Grok-1 release checkpoint?") from None
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None
    except Exception as err:  # truncated or garbled pickles raise assorted errors
        raise UserError(f"{path} is corrupt ({type(err).__name__}: {str(err)[:120]}); download it again") from None


def tensor_path(ckpt_dir: Path, index: int) -> Path:
    return Path(ckpt_dir) / f"tensor{index:05d}_000"


def find_ckpt_dir(path: Path) -> Path:
    """Accept the ``ckpt-0`` folder itself or the folder that holds it."""
    path = Path(path)
    for candidate in (path, path / "ckpt-0"):
        if tensor_path(candidate, 0).is_file():
            return candidate
    raise UserError(f"{path} holds no Grok-1 checkpoint (no ckpt-0/tensor00000_000); pass the release's ckpt-0 folder")


class ReleaseParams(Mapping[str, Any]):
    """The release checkpoint as a mapping from original names to arrays, read lazily one file at a time."""

    def __init__(self, ckpt_dir: Path, spec: ModelSpec) -> None:
        self.dir = find_ckpt_dir(ckpt_dir)
        self.names = original_names(spec)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.shapes = original_shapes(spec)
        paths = [tensor_path(self.dir, i) for i in range(len(self.names))]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise UserError(
                f"{self.dir} lacks {len(missing)} of the {len(self.names)} tensor files this spec needs "
                f"(first: {missing[0]}); is the download complete, and is --model the right spec?"
            )

    def __getitem__(self, name: str) -> np.ndarray | QuantizedWeight8bit:
        path = tensor_path(self.dir, self.index[name])
        value = read_tensor(path)
        if tuple(value.shape) != self.shapes[name]:
            raise UserError(
                f"{path.name} ({name}) has shape {tuple(value.shape)}, the spec expects {self.shapes[name]}; "
                "pass the --model this checkpoint was written for"
            )
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


# ---- writing (tests, and handing weights back to the original code) --------------------------------------
class _ReleasePickler(pickle._Pickler):  # the Python pickler: its save_global can be steered
    """Pickles like the release: numpy 1.x's reconstructor path and the record under ``__main__``."""

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if obj is QuantizedWeight8bit:
            self._write_global("__main__", "QuantizedWeight8bit", obj)
        elif obj is _reconstruct():
            self._write_global("numpy.core.multiarray", "_reconstruct", obj)
        else:
            super().save_global(obj, name)

    def _write_global(self, module: str, name: str, obj: Any) -> None:
        self.save(module)
        self.save(name)
        self.write(pickle.STACK_GLOBAL)
        self.memoize(obj)


def dumps_release(value: np.ndarray | QuantizedWeight8bit) -> bytes:
    buf = io.BytesIO()
    _ReleasePickler(buf, protocol=4).dump(value)
    return buf.getvalue()


def write_release_checkpoint(params: Mapping[str, Any], spec: ModelSpec, out_dir: Path) -> Path:
    """Write ``out_dir/ckpt-0/tensorNNNNN_000`` exactly as the release lays it out; returns the ckpt-0 path."""
    ckpt = Path(out_dir) / "ckpt-0"
    ckpt.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(original_names(spec)):
        tensor_path(ckpt, i).write_bytes(dumps_release(params[name]))
    return ckpt


def random_original_params(spec: ModelSpec, seed: int = 0, quantized: bool = True) -> dict[str, Any]:
    """Random weights under the release's names, dtypes and 8-bit layout (scales grouped as in the release)."""
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    for name, shape in original_shapes(spec).items():
        local = name.split("/", 2)[2] if name.startswith("transformer/") else name
        if name == EMBED:
            value: Any = rng.standard_normal(shape).astype(np.float32) / spec.embedding_multiplier
        elif local.endswith("/scale"):
            value = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            value = (rng.standard_normal(shape) / math.sqrt(shape[-2])).astype(np.float32)
        if quantized and local in QUANTIZED:
            groups = RELEASE_SCALE_GROUPS.get(local, 1)
            value = quantize(value, groups if shape[-2] % groups == 0 else 1)
        out[name] = value
    return out


# ---- into the model ---------------------------------------------------------------------------------------
def new_model(spec: ModelSpec):
    """An uninitialised `GrokModel` on the CPU: big ones are built on the meta device, so no time goes into
    random weights that are about to be overwritten (small ones skip meta's one-off start-up cost)."""
    from gigafactory.model import GrokModel

    if spec.params_total < 50_000_000:
        return GrokModel(spec)
    with torch.device("meta"):
        model = GrokModel(spec)
    return model.to_empty(device="cpu")


def to_torch(value: np.ndarray | QuantizedWeight8bit, transpose: bool) -> torch.Tensor:
    """One release tensor as float32 in this project's layout (8-bit weights dequantised as the release does)."""
    if isinstance(value, QuantizedWeight8bit):
        arr = dequantize(value)
    else:
        arr = np.asarray(value)
        arr = arr.astype(np.float32) if arr.dtype != np.float32 else arr
    t = torch.from_numpy(np.ascontiguousarray(arr))
    return t.t().contiguous() if transpose else t


def from_original_params(params: Mapping[str, Any], spec: ModelSpec, progress: Any = None):
    """A `GrokModel` for `spec` holding `params` (release names -> float arrays or `QuantizedWeight8bit`).

    Tensors are read from `params` one at a time (a lazy mapping such as `ReleaseParams` never holds two) and
    copied into a model built without initialisation. `progress(i, n, name)` is called after each tensor."""
    names = original_names(spec)
    unknown = sorted(set(params) - set(names))
    if unknown:
        raise UserError(f"{unknown[0]!r} is not a parameter of a Grok-1 model with this spec ({len(unknown)} unknown)")
    missing = [n for n in names if n not in params]
    if missing:
        raise UserError(f"the parameters lack {missing[0]!r} ({len(missing)} missing of {len(names)})")
    model = new_model(spec)
    state = model.state_dict()
    shapes = original_shapes(spec)
    for i, name in enumerate(names):
        ours, transpose = our_name(name)
        value = params[name]
        if tuple(value.shape) != shapes[name]:
            raise UserError(f"{name} has shape {tuple(value.shape)}; spec {spec.name!r} needs {shapes[name]}")
        with torch.no_grad():
            state[ours].copy_(to_torch(value, transpose))
        del value
        if progress is not None:
            progress(i + 1, len(names), name)
    return model.eval()


def to_original_params(model: Any) -> dict[str, np.ndarray]:
    """The model's weights under the release's names and layouts (float32; `quantize` for the 8-bit form)."""
    state = model.state_dict()
    out = {}
    for name in original_names(model.spec):
        ours, transpose = our_name(name)
        t = state[ours].detach().float()
        out[name] = (t.t() if transpose else t).contiguous().numpy()
    return out
