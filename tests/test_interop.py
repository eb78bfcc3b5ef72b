"""Grok for real: the Grok-1 tokenizer, the release checkpoint format, Hugging Face export/import."""

import json
import pickle
import pickletools

import numpy as np
import pytest
import torch

from gigafactory import tokenizer as toklib
from gigafactory.errors import UserError
from gigafactory.interop import grok1, hf
from gigafactory.interop import runs as runs_mod
from gigafactory.interop.runs import STAGING, import_grok1, stage_release, write_run
from gigafactory.model import GrokModel
from gigafactory.runs import load_for_inference
from gigafactory.specs.model_spec import ModelSpec
from grok1_reference import reference_logits

# Grok-1-shaped (tied, soft-cap 30, RoPE 10k, no dense FFN) at toy size; the full Grok-1 vocabulary so the
# released tokenizer fits it.
GROK1_TINY = dict(
    name="grok1-toy", d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, vocab_size=131_072,
    max_seq_len=64, n_experts=4, top_k=2, expert_ffn=48, embedding_multiplier=32**0.5, output_multiplier=3**-0.5,
)
GROK2_TINY = dict(
    GROK1_TINY, name="grok2-toy", vocab_size=512, dense_ffn=64, router_softcap=30.0, final_softcap=50.0,
    output_multiplier=0.5, rope_theta=208_533_496.0, tie_embeddings=False,
)


def spec_of(**kw) -> ModelSpec:
    return ModelSpec(**kw)


# ---- tokenizer --------------------------------------------------------------------------------------------
def test_grok1_tokenizer_round_trips_and_knows_the_release_ids():
    tok = toklib.grok1_tokenizer()
    assert tok.get_vocab_size() == 131_072
    assert (tok.pad_id, tok.eos_id) == (toklib.GROK1_PAD_ID, toklib.GROK1_EOS_ID) == (0, 2)
    assert [tok.sp.id_to_piece(i) for i in (0, 1, 2)] == ["[PAD]", "[BOS]", "[EOS]"]
    # The release's own example prompt (run.py) and a greeting, as the published tokenizer.model splits them.
    assert tok.encode("Hello world").ids == [11770, 1135]
    assert tok.encode("The answer to life").ids == [422, 3033, 356, 1180]
    text = "Grüße aus Köln! 東京は晴れ。 Привет, мир. 🚀 x² ≠ y\n\tend"
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text
    # Byte lengths (for bits per byte) add up to the text's UTF-8 size, plus the space SentencePiece prefixes.
    lengths = tok.byte_lengths()
    assert tok.sp.id_to_piece(ids[0]).startswith("\u2581")
    assert sum(lengths[i] for i in ids) == len(text.encode("utf-8")) + 1
    assert tok.id_to_token(ids[0]).startswith("\u2581") and tok.id_to_token(tok.sp.piece_to_id("<0x0A>")) is None


def test_training_with_the_grok1_tokenizer_and_chatting(tmp_path):
    from gigafactory.chat import ChatSession
    from gigafactory.train.config import make_config
    from gigafactory.train.loop import Trainer

    run = tmp_path / "run"
    cfg = make_config(model="tiny", tokenizer="grok-1", run_dir=run, steps=2, batch_size=2, seq_len=32,
                      eval_every=2, eval_windows=2, warmup_steps=1, dtype="fp32", checkpoint_every=2)
    result = Trainer(cfg, quiet=True).fit()
    assert result.final_val_bpb is not None and np.isfinite(result.final_val_bpb)
    assert (run / "tokenizer.model").is_file() and not (run / "tokenizer.json").exists()
    assert json.loads((run / "spec.json").read_text())["vocab_size"] == 131_072
    tokens = np.fromfile(run / "data" / "train.bin", dtype=np.uint32)
    assert tokens.max() < 131_072 and (tokens == toklib.GROK1_EOS_ID).sum() >= 1
    session = ChatSession(run, "romeo")
    assert isinstance(session.tok, toklib.SentencePieceTokenizer)
    reply = "".join(session.reply("Hello", max_tokens=3, temperature=0.0))
    assert isinstance(reply, str)


# ---- release format ---------------------------------------------------------------------------------------
def test_release_names_follow_the_flattened_tree_order():
    names = grok1.original_names(ModelSpec(**{**GROK1_TINY, "n_layers": 11}))
    assert len(names) == 2 + 12 * 11
    assert names[:3] == ["language_model/in_out_embed/embeddings", "language_model/rms_norm/scale",
                         "transformer/decoder_layer_0/moe/linear/w"]
    # sorted strings: decoder_layer_10 comes right after decoder_layer_1
    layers = [n.split("/")[1] for n in names[2::12]]
    assert layers[:3] == ["decoder_layer_0", "decoder_layer_1", "decoder_layer_10"]
    assert names[2:14] == [f"transformer/decoder_layer_0/{p}" for p in grok1.LAYER_PARAMS]


def test_release_checkpoint_reproduces_the_original_logits(tmp_path):
    spec = spec_of(**{**GROK1_TINY, "vocab_size": 512})
    params = grok1.random_original_params(spec, seed=3)
    ckpt = grok1.write_release_checkpoint(params, spec, tmp_path)
    files = sorted(p.name for p in ckpt.iterdir())
    assert files == [f"tensor{i:05d}_000" for i in range(2 + 12 * spec.n_layers)]
    raw = (ckpt / "tensor00006_000").read_bytes()  # layer 0 attention output: int8 + 8 groups of bf16 scales
    strings = [arg for op, arg, _ in pickletools.genops(raw) if op.name == "SHORT_BINUNICODE"]
    assert strings[:2] == ["__main__", "QuantizedWeight8bit"] and "numpy.core.multiarray" in strings
    # Byte signatures that public parsers of the real ckpt-0 files key on (protocol 4, the record's global,
    # numpy's dtype reduce `dtype('i1', False, True)` / `dtype('f4', ...)`).
    assert raw.startswith(b"\x80\x04") and b"\x8c\x08__main__\x94\x8c\x13QuantizedWeight8bit\x94" in raw
    assert b"\x8c\x02i1\x94\x89\x88\x87" in raw
    assert b"\x8c\x02f4\x94\x89\x88\x87" in (ckpt / "tensor00001_000").read_bytes()
    q = grok1.read_tensor(ckpt / "tensor00006_000")
    assert q.weight.dtype == np.int8 and str(q.scales.dtype) == "bfloat16" and q.scales.shape == (8, spec.d_model)
    assert grok1.read_tensor(ckpt / "tensor00001_000").dtype == np.float32

    model = grok1.from_original_params(grok1.ReleaseParams(tmp_path, spec), spec)
    tokens = np.random.default_rng(0).integers(1, spec.vocab_size, size=(3, 40))
    ref = reference_logits(params, spec, tokens)
    with torch.no_grad():
        ours = model(torch.from_numpy(tokens)).numpy()
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
    # Within bf16 precision of the logit scale (the original computes in bf16; both sides here in fp32).
    assert np.abs(ours - ref).max() <= 2**-8 * np.abs(ref).max()
    back = grok1.to_original_params(model)
    assert np.array_equal(back[grok1.EMBED], params[grok1.EMBED])


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_or_corrupt_pickles_are_refused(tmp_path, cli):
    spec = spec_of(**GROK1_TINY)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec.model_dump()))
    ckpt = grok1.write_release_checkpoint(grok1.random_original_params(spec), spec, tmp_path / "release")
    marker = tmp_path / "pwned"
    (ckpt / "tensor00003_000").write_bytes(pickle.dumps(_Evil(str(marker))))
    proc = cli("import", "grok-1", str(ckpt), "--run-dir", str(tmp_path / "run"), "--model", str(spec_file))
    assert proc.returncode == 2 and not marker.exists()
    assert "refusing" in proc.stderr and "io.open" in proc.stderr and "Traceback" not in proc.stderr
    (ckpt / "tensor00003_000").write_bytes(grok1.dumps_release(np.zeros(3, dtype=object)))
    with pytest.raises(UserError, match="dtype object"):
        grok1.read_tensor(ckpt / "tensor00003_000")
    (ckpt / "tensor00003_000").write_bytes(b"\x80\x04garbage")
    with pytest.raises(UserError, match="tensor00003_000 is corrupt"):
        import_grok1(ckpt, tmp_path / "run", spec)
    with pytest.raises(UserError, match="vocab_size 512, but the run will use the Grok-1 tokenizer"):
        import_grok1(ckpt, tmp_path / "run", spec.model_copy(update={"vocab_size": 512}))


def test_interrupted_import_resumes_then_chats_and_serves(tmp_path, cli, monkeypatch):
    from fastapi.testclient import TestClient

    from gigafactory.serve.api import build_state, create_app

    spec = spec_of(**GROK1_TINY)
    params = grok1.random_original_params(spec, seed=1)
    ckpt = grok1.write_release_checkpoint(params, spec, tmp_path / "release")
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        stage_release(ckpt, spec, run, stop_after=5)
    assert len(list((run / STAGING).glob("*.safetensors"))) == 5
    converted = []
    real = runs_mod._stage_one
    monkeypatch.setattr(runs_mod, "_stage_one", lambda rel, i, *a: converted.append(i) or real(rel, i, *a))
    import_grok1(ckpt, run, spec, log=lambda s: None)
    assert converted == list(range(5, len(params)))  # the 5 staged tensors were reused, not converted again
    assert not (run / STAGING).exists()
    with pytest.raises(UserError, match="already holds a checkpoint"):
        import_grok1(ckpt, run, spec)

    model, tok, step = load_for_inference(run)
    assert step == 0 and isinstance(tok, toklib.SentencePieceTokenizer)
    direct = grok1.from_original_params(params, spec)
    tokens = torch.randint(1, spec.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(tokens), direct(tokens))

    proc = cli("chat", str(run), "--persona", "grok", "--prompt", "Hello", "--max-tokens", "3", "--temperature", "0",
               "--weights", "int8")
    assert proc.returncode == 0, proc.stderr
    state = build_state(run, weights="int8")
    assert state.engine.eos_id == toklib.GROK1_EOS_ID  # the server stops at the release's [EOS], not BPE's id 1
    with TestClient(create_app(state)) as client:
        r = client.post("/v1/completions", json={"model": "grok", "prompt": "Hello", "max_tokens": 3,
                                                 "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1


# ---- Hugging Face -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [GROK1_TINY, GROK2_TINY], ids=["grok-1", "grok-2"])
def test_hf_export_import_round_trip_is_bitwise(tmp_path, cli, shape):
    spec = spec_of(**{**shape, "vocab_size": 512})
    model = GrokModel(spec)
    model.init_weights(seed=7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn(p.shape) * 0.1)  # norms away from 1, so a swapped norm would show
    src, out, back = tmp_path / "src", tmp_path / "hf", tmp_path / "back"
    write_run(src, model, toklib.GROK1, {"format": "test"})
    if spec.dense_ffn:  # once through the command line
        cli("export", str(src), "--format", "hf", "--out", str(out), "--shard-mb", "0.02", check=True)
    else:
        hf.export(src, out, shard_mb=0.02)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["embedding_multiplier_scale"] == spec.embedding_multiplier
    assert cfg["output_multiplier_scale"] == spec.output_multiplier
    assert cfg["attn_logit_softcapping"] == spec.attn_softcap
    assert cfg["router_logit_softcapping"] == spec.router_softcap
    assert cfg["final_logit_softcapping"] == spec.final_softcap
    assert cfg["residual_moe"] == bool(spec.dense_ffn) and cfg["moe_intermediate_size"] == spec.expert_ffn
    index = json.loads((out / hf.INDEX).read_text())["weight_map"]
    assert len(set(index.values())) > 1 and (out / "tokenizer.model").is_file()
    assert "model.layers.1.moe_block.experts.3.linear_1.weight" in index
    assert "model.layers.0.attn.o_proj.weight" in index and "model.layers.0.post_moe_norm.weight" in index
    assert ("lm_head.weight" in index) == (not spec.tie_embeddings)
    assert ("model.layers.0.mlp.down_proj.weight" in index) == bool(spec.dense_ffn)
    from safetensors import safe_open

    with safe_open(str(out / index["model.layers.1.moe_block.experts.2.linear.weight"]), "pt") as f:
        gate = f.get_tensor("model.layers.1.moe_block.experts.2.linear.weight")  # HF: the GELU-gated branch
    assert torch.equal(gate, model.layers["1"].moe.experts.w_gate[2].t())
    if spec.dense_ffn:  # the command line, for a folder without tokenizer files
        (out / "tokenizer.model").unlink()
        with pytest.raises(UserError, match="no tokenizer.json or tokenizer.model.*--tokenizer grok-1"):
            write_run(back, model, out, {})
        cli("import", "hf", str(out), "--run-dir", str(back), "--tokenizer", "grok-1", check=True)
        assert (back / "tokenizer.model").read_bytes() == toklib.grok1_model_path().read_bytes()
    else:
        write_run(back, hf.load_hf(out)[0], out, {})
    loaded, _, _ = load_for_inference(back)
    assert loaded.spec == spec
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_hf_import_refuses_incomplete_or_foreign_checkpoints(tmp_path, cli_here):
    spec = spec_of(**{**GROK1_TINY, "vocab_size": 512})
    src, out = tmp_path / "src", tmp_path / "hf"
    write_run(src, GrokModel(spec), toklib.GROK1, {})
    hf.export(src, out, shard_mb=1000)
    from safetensors.torch import load_file, save_file

    shard = next(out.glob("model-*.safetensors"))
    tensors = load_file(str(shard))
    tensors.pop("model.layers.1.moe_block.experts.2.linear_v.weight")
    save_file(tensors, str(shard))
    with pytest.raises(UserError, match="lacks layers.1.moe.experts.w_up"):
        hf.load_hf(out)
    tensors["model.layers.0.something_else.weight"] = torch.zeros(2)
    save_file(tensors, str(shard))
    code, _, err = cli_here("import", "hf", str(out), "--run-dir", str(tmp_path / "r2"))
    assert code == 2 and "unknown tensor" in err and "Traceback" not in err


# ---- 8-bit weights ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [GROK1_TINY, GROK2_TINY], ids=["grok-1", "grok-2"])
def test_int8_weights_halve_memory_and_track_full_precision(tmp_path, shape):
    from gigafactory.interop.int8 import Int8Experts, Int8Linear, weight_bytes

    spec = spec_of(**{**shape, "vocab_size": 512, "d_model": 64, "expert_ffn": 128})
    model = GrokModel(spec)
    model.init_weights(seed=2)
    write_run(tmp_path / "run", model, toklib.GROK1, {})
    full, _, _ = load_for_inference(tmp_path / "run")
    int8, _, _ = load_for_inference(tmp_path / "run", weights="int8")
    # Every attention projection, expert and dense-FFN matrix is int8 now; nothing of them stays in float.
    quantized = [m for m in int8.modules() if isinstance(m, Int8Linear | Int8Experts)]
    assert len(quantized) == spec.n_layers * (5 + (3 if spec.dense_ffn else 0))
    assert all(b.dtype in (torch.int8, torch.float32) for m in quantized for b in m.buffers())
    matrices = {n: p for n, p in full.named_parameters() if ".attn." in n or ".experts." in n or ".dense." in n}
    bf16_bytes = sum(p.numel() * 2 for p in matrices.values())
    int8_bytes = sum(weight_bytes(m) for m in quantized)
    assert int8_bytes <= 0.56 * bf16_bytes  # 1 byte per weight + one fp32 scale per output channel
    assert weight_bytes(int8) < weight_bytes(full) - 0.7 * sum(p.numel() * 4 for p in matrices.values())

    tokens = torch.randint(1, spec.vocab_size, (4, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = full(tokens), int8(tokens)
    # int8 rounding moves each weight by at most max|row|/254, about 1% of a matmul's output; a few layers
    # compound it: logits within 5% (relative RMS) of full precision.
    assert ((a - b).pow(2).mean() / a.pow(2).mean()).sqrt() < 0.05
    # Greedy choices agree wherever full precision's top-2 margin exceeds twice the row's largest int8 error
    # (closer calls are ties within quantisation noise); such positions are most of them.
    top2 = a.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * (a - b).abs().amax(-1)
    assert clear.float().mean() > 0.5
    assert torch.equal(a.argmax(-1)[clear], b.argmax(-1)[clear])
