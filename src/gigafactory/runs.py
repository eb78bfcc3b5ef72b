"""Reading a run directory for inference: spec, tokenizer and the newest verified weights. The trainer writes
it; chat and the server read it (and nothing else)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer

from gigafactory import checkpoint as ckpt
from gigafactory.errors import UserError
from gigafactory.model import GrokModel
from gigafactory.specs.model_spec import ModelSpec, spec_from_dict
from gigafactory.tokenizer import load_tokenizer


def load_run_spec(run_dir: Path) -> ModelSpec:
    path = Path(run_dir) / "spec.json"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no spec.json); train one with `gigafactory train`")
    return spec_from_dict(json.loads(path.read_text()), str(path))


WEIGHTS = ("full", "int8")


def load_for_inference(
    run_dir: Path, device: torch.device | None = None, quiet: bool = False, weights: str = "full"
) -> tuple[GrokModel, Tokenizer, int]:
    """(model in eval mode, tokenizer, step of the checkpoint loaded). ``weights="int8"`` keeps the linear and
    expert weights as per-channel int8 (`gigafactory.interop.int8`)."""
    if weights not in WEIGHTS:
        raise UserError(f"unknown --weights {weights!r}; choose one of {', '.join(WEIGHTS)}")
    spec = load_run_spec(run_dir)
    tok = load_tokenizer(run_dir)
    model = GrokModel(spec)
    state = {"model": model.state_dict()}
    loaded = ckpt.load_latest(Path(run_dir), state)
    if loaded is None:
        raise UserError(f"{run_dir} has no checkpoint yet; train it first")
    if not quiet:
        for line in loaded.skipped:
            print(f"warning: {line}; using an older checkpoint")
    model.load_state_dict(state["model"])
    if weights == "int8":
        from gigafactory.interop.int8 import quantize_model

        del state
        quantize_model(model)
    return model.to(device or torch.device("cpu")).eval(), tok, int(loaded.manifest["step"])
