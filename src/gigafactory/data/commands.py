"""`gigafactory data prepare`."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from gigafactory.errors import UserError

console = Console()
data_app = typer.Typer(help="Prepare training data: clean, filter, deduplicate, tokenize, shard.",
                       no_args_is_help=True)


def _load_rules(path: Path | None) -> dict[str, object]:
    if path is None:
        return {}
    try:
        obj = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"--rules {path}: no such file") from None
    except json.JSONDecodeError as err:
        raise UserError(f"--rules {path} is not JSON: {err.msg} at line {err.lineno}") from None
    if not isinstance(obj, dict):
        raise UserError(f"--rules {path} must hold a JSON object of rule thresholds (see docs/data.md)")
    return obj


@data_app.command("prepare")
def prepare(
    inputs: list[Path] = typer.Argument(..., help="JSONL, Parquet or text files or folders (.gz/.zst too)"),
    out: Path = typer.Option(..., "--out", help="the dataset folder to write (resumes an unfinished one)"),
    text_field: str = typer.Option("text", help="JSONL/Parquet field holding the document text"),
    id_field: str = typer.Option("id", help="field holding a document id (kept in dropped.jsonl)"),
    rules: Path | None = typer.Option(None, help="JSON object overriding quality-rule thresholds"),
    lang: str | None = typer.Option(None, help="keep only this language (stop-word check): en, de, fr, ..."),
    no_pii: bool = typer.Option(False, "--no-pii-scrub", help="keep e-mail addresses, phones and IPs"),
    no_near_dedup: bool = typer.Option(False, "--no-near-dedup", help="skip MinHash near-duplicate removal"),
    tokenizer: str = typer.Option("bpe", help="'bpe' (trained on a sample), 'grok-1', or a tokenizer.json/.model"),
    vocab_size: int = typer.Option(8192, help="BPE vocabulary (must not exceed the model's)"),
    shard_tokens: int = typer.Option(1 << 24, help="tokens per shard"),
    val_fraction: float = typer.Option(0.01, help="fraction of documents held out for validation"),
    part_mb: int = typer.Option(32, help="MB of input per parallel task"),
    workers: int | None = typer.Option(None, help="local worker processes (default: all cores)"),
    ray: str | None = typer.Option(None, help="run on Ray Data: 'auto' (local or RAY_ADDRESS) or an address"),
    keep_work: bool = typer.Option(False, help="keep the intermediate files in OUT/work"),
) -> None:
    """Raw documents -> normalised, filtered, PII-scrubbed, deduplicated, tokenized fixed-size shards."""
    from pydantic import ValidationError

    from gigafactory.data.executors import make_engine
    from gigafactory.data.pipeline import PrepareConfig
    from gigafactory.data.pipeline import prepare as run

    rule_values = _load_rules(rules)
    if lang is not None:
        rule_values["language"] = lang
    try:
        cfg = PrepareConfig(text_field=text_field, id_field=id_field, rules=rule_values, scrub_pii=not no_pii,
                            near_dedup=not no_near_dedup, tokenizer=tokenizer, vocab_size=vocab_size,
                            shard_tokens=shard_tokens, val_fraction=val_fraction, part_bytes=part_mb << 20)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise UserError(f"invalid option {where}: {first['msg']}") from None
    if lang is not None:
        from gigafactory.data.clean import STOPWORDS

        if lang not in STOPWORDS:
            raise UserError(f"--lang {lang}: unknown; choose one of {', '.join(STOPWORDS)}")
    engine = make_engine(ray, workers)
    result = run(inputs, out, cfg, engine, keep_work=keep_work)
    m = result.manifest
    skipped = ", ".join(f"{k} {v}" for k, v in result.skipped.items() if v)
    console.print(f"{out}: {m['splits']['train']['tokens']:,} train / {m['splits']['val']['tokens']:,} validation "
                  f"tokens; report {out / 'report.html'}" + (f" (resumed: skipped {skipped})" if skipped else ""),
                  highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
