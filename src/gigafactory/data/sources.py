"""Reading raw documents: JSONL (one document per line), Parquet, and folders of plain text, each optionally
compressed (gzip, zstd). Inputs are cut into *parts*, the unit of parallel work and of resumption: a compressed
or plain-text file is one part, an uncompressed JSONL file is cut at byte offsets (a line belongs to the part it
starts in), a Parquet file at row groups. Parts are numbered in a fixed order (sorted paths, then offsets), which
is the canonical order of documents: "first" always means first in that order.

Nothing here trusts the input: a line that is not JSON, has no text field, or is not UTF-8 is yielded as a
`Malformed` record with its reason, and the pipeline counts it; it never ends the run."""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from gigafactory.errors import UserError

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
TEXT_SUFFIXES = (".txt", ".md", ".text")
PARQUET_SUFFIXES = (".parquet",)
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}


@dataclass(frozen=True)
class Part:
    """A slice of one input file: bytes [start, end) of a JSONL file, row groups [start, end) of a Parquet file,
    or the whole file (end = -1)."""

    index: int
    path: str
    kind: str  # jsonl | parquet | text
    compression: str | None
    start: int = 0
    end: int = -1

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class Document:
    id: str
    text: str


@dataclass
class Malformed:
    id: str
    reason: str


def classify(path: Path) -> tuple[str, str | None] | None:
    """(kind, compression) of a file from its suffixes, or None if it is not an input format."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    if compression:
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last in JSONL_SUFFIXES:
        return "jsonl", compression
    if last in PARQUET_SUFFIXES and compression is None:
        return "parquet", None
    if last in TEXT_SUFFIXES:
        return "text", compression
    return None


def list_files(inputs: list[Path]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        item = Path(item)
        if not item.exists():
            raise UserError(f"input {item} does not exist; give JSONL, Parquet or text files, or folders of them")
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and classify(p) is not None)
            if not found:
                raise UserError(f"folder {item} holds no .jsonl, .parquet or .txt files (optionally .gz/.zst)")
            files.extend(found)
        elif classify(item) is None:
            raise UserError(f"{item}: unknown format; use .jsonl/.ndjson, .parquet or .txt (optionally .gz/.zst)")
        else:
            files.append(item)
    return files


def make_parts(inputs: list[Path], part_bytes: int) -> list[Part]:
    """Cut the inputs into parts of about `part_bytes` (uncompressed JSONL) or whole files / row-group ranges."""
    parts: list[Part] = []
    for f in list_files(inputs):
        kind, comp = classify(f)  # type: ignore[misc]
        if kind == "jsonl" and comp is None:
            size = f.stat().st_size
            for start in range(0, max(size, 1), part_bytes):
                parts.append(Part(len(parts), str(f), kind, None, start, min(start + part_bytes, size)))
        elif kind == "parquet":
            groups = _parquet_row_groups(f)
            per = max(1, part_bytes // max(1, f.stat().st_size // max(groups, 1)))
            for start in range(0, max(groups, 1), per):
                parts.append(Part(len(parts), str(f), kind, None, start, min(start + per, groups)))
        else:
            parts.append(Part(len(parts), str(f), kind, comp))
    return parts


def part_size(part: Part) -> int:
    """Input bytes a part stands for (a Parquet file's bytes are counted with its first part)."""
    if part.kind == "jsonl" and part.end >= 0:
        return part.end - part.start
    if part.kind == "parquet" and part.start > 0:
        return 0
    return Path(part.path).stat().st_size


def _parquet_row_groups(path: Path) -> int:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).num_row_groups
    except Exception as err:  # pyarrow raises several error types for a damaged file
        raise UserError(f"{path} is not a readable Parquet file: {str(err).splitlines()[0]}") from None


def _open_binary(path: str, compression: str | None) -> io.BufferedIOBase:
    if compression == "gzip":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if compression == "zstd":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def read_part(part: Part, text_field: str, id_field: str) -> Iterator[Document | Malformed]:
    """The documents of one part, in order."""
    name = Path(part.path).name
    if part.kind == "text":
        with _open_binary(part.path, part.compression) as f:
            raw = f.read()
        try:
            yield Document(name, raw.decode("utf-8"))
        except UnicodeDecodeError:
            yield Malformed(name, "not UTF-8")
    elif part.kind == "parquet":
        yield from _read_parquet(part, text_field, id_field)
    else:
        yield from _read_jsonl(part, text_field, id_field)


def _read_jsonl(part: Part, text_field: str, id_field: str) -> Iterator[Document | Malformed]:
    name = Path(part.path).name
    with _open_binary(part.path, part.compression) as f:
        offset = part.start
        if part.start > 0:  # the line under `start` belongs to the previous part
            f.seek(part.start - 1)
            offset = part.start - 1 + len(f.readline())
        while part.end < 0 or offset < part.end:
            line = f.readline()
            if not line:
                break
            where, offset = f"{name}@{offset}", offset + len(line)
            if not line.strip():
                continue
            yield _parse_line(line, where, text_field, id_field)


def _parse_line(line: bytes, where: str, text_field: str, id_field: str) -> Document | Malformed:
    try:
        obj = json.loads(line)
    except UnicodeDecodeError:
        return Malformed(where, "not UTF-8")
    except json.JSONDecodeError as err:
        return Malformed(where, f"not JSON ({err.msg})")
    if not isinstance(obj, dict):
        return Malformed(where, "not a JSON object")
    text = obj.get(text_field)
    if not isinstance(text, str):
        return Malformed(where, f"no string field {text_field!r}")
    doc_id = obj.get(id_field)
    return Document(str(doc_id) if isinstance(doc_id, str | int) else where, text)


def _read_parquet(part: Part, text_field: str, id_field: str) -> Iterator[Document | Malformed]:
    import pyarrow.parquet as pq

    name = Path(part.path).name
    pf = pq.ParquetFile(part.path)
    names = set(pf.schema_arrow.names)
    if text_field not in names:
        yield Malformed(f"{name}#rg{part.start}", f"no column {text_field!r}")
        return
    columns = [text_field] + ([id_field] if id_field in names else [])
    row = sum(pf.metadata.row_group(g).num_rows for g in range(part.start))
    for g in range(part.start, part.end):
        table = pf.read_row_group(g, columns=columns)
        texts = table.column(text_field).to_pylist()
        ids = table.column(id_field).to_pylist() if id_field in names else [None] * len(texts)
        for text, doc_id in zip(texts, ids, strict=True):
            where = f"{name}#{row}"
            row += 1
            if not isinstance(text, str):
                yield Malformed(where, f"no string field {text_field!r}")
            else:
                yield Document(str(doc_id) if doc_id is not None else where, text)
