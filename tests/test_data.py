"""The data factory: cleaning rules, dedup quality on planted duplicates, resumption after a kill, Ray = local."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from gigafactory.data import clean, dedup, synthetic
from gigafactory.data.executors import LocalEngine
from gigafactory.data.pipeline import PrepareConfig, prepare
from gigafactory.errors import UserError
from gigafactory.util import sha256_file

SMALL = dict(vocab_size=512, shard_tokens=20_000, part_bytes=60_000, val_fraction=0.02)


def test_normalise_and_pii_scrub():
    raw = "Cafe\u0301  au\tlait\x00\x07\r\n\n\n\nnext  line  "
    assert clean.normalise(raw) == "Café au lait\n\nnext line"
    text, counts = clean.scrub_pii("mail bob.smith@example.co.uk or call +44 20 7946 0958 or (555) 123-4567; "
                                   "host 192.168.10.254 and fe80:0:0:0:0:0:0:1; version 1.2.3 in 2024")
    assert counts == {"email": 1, "phone": 2, "ip": 2}
    assert "example" not in text and "7946" not in text and "192.168" not in text
    assert "1.2.3" in text and "2024" in text  # not PII: too few digits
    assert clean.scrub_pii("part 12-34-56 of the kit") == ("part 12-34-56 of the kit", {})


def test_quality_rules_name_the_failing_rule():
    rules = clean.QualityRules()
    good = ("The old house on the hill was painted red last spring. Its owner, a retired teacher, grows tomatoes "
            "and beans in the garden behind it. Neighbours say the view of the valley is the best in town.")
    assert clean.quality_failure(good, rules) is None
    assert clean.quality_failure("too short", rules) == "too_short"
    assert clean.quality_failure("buy now " * 30, rules) == "top_2gram"
    assert clean.quality_failure("### " * 10 + good, rules) == "symbol_ratio"
    assert clean.quality_failure("\n".join(["- item one", "- item two"] * 5 + ["x y z w"]), rules) is not None
    assert clean.quality_failure("12 34 56 78 90 11 12 13 14 15 the", rules) == "alpha_words"
    repeated = "one two three four five six seven eight nine ten eleven twelve thirteen. " * 2
    greek = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau"
    assert clean.quality_failure(repeated + greek, rules) == "duplicate_5grams"
    fr = "Le chat est sur la table et le chien est dans la maison avec une balle pour le jeu."
    assert clean.quality_failure(fr, rules.model_copy(update={"language": "en"})) == "language"
    assert clean.quality_failure(fr, rules.model_copy(update={"language": "fr"})) is None


def test_lsh_parameters_target_the_stated_threshold():
    cfg = dedup.DedupConfig()
    assert cfg.rows * cfg.bands == cfg.num_perm
    assert cfg.candidate_probability(0.8) > 0.99 and cfg.candidate_probability(0.25) < 0.01
    hasher = dedup.MinHasher(cfg)
    a = " ".join(f"w{i}" for i in range(400))
    b = " ".join(f"w{i}" for i in range(40, 440))  # Jaccard 360/440 = 0.82
    est = float((hasher.signature(a) == hasher.signature(b)).mean())
    assert abs(est - dedup.jaccard(a, b)) < 0.1


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    corp = synthetic.make_corpus(seed=7, n_distinct=1200, near_fraction=0.25, exact_fraction=0.05,
                                 jaccard_range=(0.7, 0.95))
    paths = synthetic.write_jsonl(corp, folder / "in", files=3)
    # Malformed lines in the middle of the first file: counted, reported, never fatal.
    lines = paths[0].read_text().splitlines(keepends=True)
    lines[10:10] = ['{"id": "broken", "text": \n', '["not", "an", "object"]\n', '{"id": "no-text"}\n',
                    b'{"id": "latin1", "text": "caf\xe9"}\n'.decode("latin-1")]
    paths[0].write_bytes("".join(lines).encode("utf-8").replace("caf\u00e9".encode(), b"caf\xe9"))
    return corp, folder / "in"


def _read_dropped(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "dropped.jsonl").read_text().splitlines()]


def test_prepare_removes_planted_duplicates_and_writes_verified_shards(corpus, tmp_path):
    corp, inputs = corpus
    out = tmp_path / "ds"
    result = prepare([inputs], out, PrepareConfig(**SMALL), LocalEngine(1), quiet=True)
    dropped = _read_dropped(out)
    s = synthetic.score(corp, dropped)
    assert s["near_planted"] >= 120
    assert s["near_recall"] >= 0.95, s
    assert s["exact_recall"] == 1.0, s
    assert s["distinct_removed"] < 0.01, s
    by_id = {d["id"]: d for d in dropped}
    assert all(by_id[c]["reason"] == "exact_duplicate" for c in corp.exact_ids)  # found by hash, before MinHash
    for cid, src in list(corp.source_of.items())[:50]:
        if cid in by_id:
            assert by_id[cid]["duplicate_of"] == src
    malformed = {d["id"]: d for d in dropped if d["reason"] == "malformed"}
    assert len(malformed) == 4 and result.manifest["stats"]["malformed"] == 4
    assert any("not JSON" in d["detail"] for d in malformed.values())
    m = json.loads((out / "dataset.json").read_text())
    dtype = np.dtype(m["dtype"])
    for split in ("train", "val"):
        shards = m["splits"][split]["shards"]
        assert shards and all(s["tokens"] == m["shard_tokens"] for s in shards[:-1])
        total = 0
        for sh in shards:
            assert sha256_file(out / sh["file"]) == sh["sha256"]
            arr = np.memmap(out / sh["file"], dtype=dtype, mode="r")
            assert len(arr) == sh["tokens"] and int((arr == m["eos_id"]).sum()) == sh["documents"]
            total += sh["documents"]
        assert total == m["splits"][split]["documents"]
    kept = m["stats"]["kept_train"] + m["stats"]["kept_val"]
    assert kept + len(dropped) == m["stats"]["read"]
    assert m["splits"]["val"]["documents"] == m["stats"]["kept_val"] > 0
    assert "plotly" in (out / "report.html").read_text()[:5000000]
    assert not (out / "work").exists()


def test_other_formats_zstd_parquet_text(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    corp = synthetic.make_corpus(seed=3, n_distinct=60, near_fraction=0, exact_fraction=0)
    docs = corp.docs
    (tmp_path / "in").mkdir()
    body = "".join(json.dumps({"content": d["text"], "uid": d["id"]}) + "\n" for d in docs[:20])
    (tmp_path / "in" / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(body.encode()))
    table = pa.table({"content": [d["text"] for d in docs[20:40]], "uid": [d["id"] for d in docs[20:40]]})
    pq.write_table(table, tmp_path / "in" / "b.parquet", row_group_size=7)
    for d in docs[40:]:
        (tmp_path / "in" / f"{d['id']}.txt.gz").write_bytes(gzip.compress(d["text"].encode()))
    out = tmp_path / "ds"
    cfg = PrepareConfig(text_field="content", id_field="uid", vocab_size=300, shard_tokens=5000, val_fraction=0)
    result = prepare([tmp_path / "in"], out, cfg, LocalEngine(1), quiet=True)
    assert result.manifest["stats"]["read"] == 60 and result.manifest["stats"]["malformed"] == 0
    assert result.manifest["splits"]["train"]["documents"] == 60


def _tree(out: Path) -> dict[str, bytes]:
    files = [p for p in sorted(out.rglob("*")) if p.is_file() and "work" not in p.relative_to(out).parts]
    return {str(p.relative_to(out)): p.read_bytes() for p in files
            if p.suffix in (".bin", ".jsonl") or p.name == "tokenizer.json"}


def test_resume_after_a_kill_redoes_no_finished_shard(tmp_path, cli):
    inputs = tmp_path / "in"
    synthetic.write_jsonl(synthetic.make_corpus(seed=5, n_distinct=300), inputs, files=2)
    ref = tmp_path / "ref"
    cfg = PrepareConfig(vocab_size=300, shard_tokens=8000, val_fraction=0.05)
    prepare([inputs], ref, cfg, LocalEngine(1), quiet=True)
    out = tmp_path / "ds"
    args = ["data", "prepare", str(inputs), "--out", str(out), "--vocab-size", "300", "--shard-tokens", "8000",
            "--val-fraction", "0.05", "--workers", "1"]
    proc = cli(*args, env={"GIGAFACTORY_DATA_CRASH": "pack-train:2"})
    assert proc.returncode == 17, proc.stderr  # died abruptly right after writing shard 2
    finished = {p.name: p.stat() for p in (out / "train").glob("shard-*.bin")}
    assert sorted(finished) == ["shard-00000.bin", "shard-00001.bin", "shard-00002.bin"]
    scans = {p.name: p.stat().st_mtime_ns for p in (out / "work" / "scan").glob("*.json")}
    proc = cli(*args, "--keep-work", check=True)
    assert scans == {p.name: p.stat().st_mtime_ns for p in (out / "work" / "scan").glob("*.json")}
    assert "skipped scan" in proc.stdout and "shards 3" in proc.stdout, proc.stdout
    for name, st in finished.items():  # same file, never rewritten
        now = (out / "train" / name).stat()
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    assert _tree(out) == _tree(ref)
    with pytest.raises(UserError, match="already holds a prepared dataset"):  # a finished dataset is kept
        prepare([inputs], out, cfg, LocalEngine(1), quiet=True)


def test_cli_errors_are_one_line(tmp_path, cli):
    proc = cli("data", "prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="unknown format"):
        prepare([tmp_path / "x.csv"], tmp_path / "o", PrepareConfig(), LocalEngine(1), quiet=True)


def test_local_and_ray_give_identical_shards(ray_session, tmp_path):
    from gigafactory.data.executors import RayEngine

    corp = synthetic.make_corpus(seed=11, n_distinct=150, near_fraction=0.2, exact_fraction=0.05)
    inputs = tmp_path / "in"
    synthetic.write_jsonl(corp, inputs, files=2)
    cfg = PrepareConfig(vocab_size=300, shard_tokens=8_000, part_bytes=60_000, val_fraction=0.05)
    prepare([inputs], tmp_path / "local", cfg, LocalEngine(1), quiet=True)
    prepare([inputs], tmp_path / "ray", cfg, RayEngine(), quiet=True)
    a, b = _tree(tmp_path / "local"), _tree(tmp_path / "ray")
    assert len([k for k in a if k.endswith(".bin")]) >= 4
    assert a == b
