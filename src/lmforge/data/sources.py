"""Read documents from local files (txt, jsonl, json, parquet, csv, SQuAD json; optionally .gz/.zst)
or, when no local copy exists, from the Hugging Face Hub.

Local copies are looked up first under the data dir (`--data-dir` or env LMFORGE_DATA_DIR), so the
same recipe runs offline against a mirror and online against the Hub.
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from lmforge.config import SourceConfig
from lmforge.errors import LmforgeError

log = logging.getLogger("lmforge")

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".csv")
COMPRESSIONS = (".gz", ".zst")


@dataclass
class QAExample:
    id: str
    question: str
    context: str
    answers: list[str]
    answer_starts: list[int]
    title: str = ""


def data_dir_from_env(data_dir: str | Path | None) -> Path | None:
    value = data_dir or os.environ.get("LMFORGE_DATA_DIR")
    return Path(value).expanduser() if value else None


def _strip_compression(name: str) -> tuple[str, str]:
    for comp in COMPRESSIONS:
        if name.endswith(comp):
            return name[: -len(comp)], comp
    return name, ""


def file_format(path: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    base, _ = _strip_compression(path.name)
    suffix = Path(base).suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise LmforgeError(f"{path}: unsupported file type (supported: {', '.join(SUPPORTED_SUFFIXES)}, optionally .gz/.zst)")
    return suffix[1:]


def _is_supported(path: Path) -> bool:
    base, _ = _strip_compression(path.name)
    return Path(base).suffix.lower() in SUPPORTED_SUFFIXES


def local_files(src: SourceConfig, data_dir: Path | None) -> list[Path]:
    """Files matching the source's local glob: under data_dir first, else as given. Empty if none."""
    if not src.local:
        return []
    candidates = []
    if data_dir is not None and not Path(src.local).is_absolute():
        candidates.append(str(data_dir / src.local))
    candidates.append(os.path.expanduser(src.local))
    for pattern in candidates:
        matched: list[Path] = []
        for hit in sorted(glob.glob(pattern, recursive=True)):
            p = Path(hit)
            if p.is_dir():
                matched.extend(sorted(f for f in p.rglob("*") if f.is_file() and _is_supported(f)))
            elif p.is_file():
                matched.append(p)
        if matched:
            return matched
        if any(Path(h).is_dir() for h in glob.glob(pattern)):
            raise LmforgeError(f"source '{src.name}': directory {pattern} has no supported files "
                               f"({', '.join(SUPPORTED_SUFFIXES)})")
    return []


def open_binary(path: Path) -> BinaryIO:
    try:
        if path.name.endswith(".gz"):
            return gzip.open(path, "rb")
        if path.name.endswith(".zst"):
            import zstandard

            return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
        return open(path, "rb")
    except OSError as exc:
        raise LmforgeError(f"{path}: cannot open ({exc.strerror or exc})") from None


def _decode(raw: bytes, path: Path, where: str, counter: dict[str, int]) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        counter["replaced"] = counter.get("replaced", 0) + 1
        if counter["replaced"] <= 3:
            log.warning("%s%s: invalid UTF-8 bytes replaced with U+FFFD", path, where)
        return raw.decode("utf-8", errors="replace")


def _read_text(path: Path, counter: dict[str, int]) -> str:
    with open_binary(path) as fh:
        try:
            raw = fh.read()
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise LmforgeError(f"{path}: corrupt or truncated file ({exc})") from None
    return _decode(raw, path, "", counter)


def _field(record: Any, field: str, path: Path, where: str) -> str | None:
    if not isinstance(record, dict):
        raise LmforgeError(f"{path}{where}: expected a JSON object per record, got {type(record).__name__}")
    value = record.get(field)
    return value if isinstance(value, str) else None


def _iter_jsonl(path: Path, field: str, counter: dict[str, int]) -> Iterator[str]:
    with open_binary(path) as fh:
        for lineno, raw in enumerate(fh, 1):
            line = _decode(raw, path, f":{lineno}", counter).strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                counter["bad_json"] = counter.get("bad_json", 0) + 1
                log.warning("%s:%d: invalid JSON skipped (%s)", path, lineno, exc.msg)
                continue
            text = _field(record, field, path, f":{lineno}")
            if text is None:
                counter["missing_field"] = counter.get("missing_field", 0) + 1
                log.warning("%s:%d: no string field '%s'; record skipped", path, lineno, field)
                continue
            yield text


def _load_json(path: Path, counter: dict[str, int]) -> Any:
    try:
        return json.loads(_read_text(path, counter))
    except json.JSONDecodeError as exc:
        raise LmforgeError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno} ({exc.msg})") from None


def _is_squad(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("data"), list)


def _iter_json(path: Path, field: str, counter: dict[str, int]) -> Iterator[str]:
    obj = _load_json(path, counter)
    if _is_squad(obj):  # SQuAD file used as pretraining text: its unique paragraphs
        yield from _squad_contexts(obj, path)
        return
    if not isinstance(obj, list):
        raise LmforgeError(f"{path}: expected a JSON list of records or a SQuAD file")
    for i, record in enumerate(obj):
        text = _field(record, field, path, f"[{i}]")
        if text is not None:
            yield text


def _iter_parquet(path: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a malformed file
        raise LmforgeError(f"{path}: not a readable parquet file ({exc})") from None
    if field not in pf.schema_arrow.names:
        raise LmforgeError(f"{path}: no column '{field}' (columns: {', '.join(pf.schema_arrow.names)})")
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str):
                yield text


def _iter_csv(path: Path, field: str, counter: dict[str, int]) -> Iterator[str]:
    reader = csv.DictReader(io.StringIO(_read_text(path, counter)))
    if reader.fieldnames is None or field not in reader.fieldnames:
        raise LmforgeError(f"{path}: no column '{field}' (columns: {', '.join(reader.fieldnames or [])})")
    for row in reader:
        if row.get(field):
            yield row[field]


def _squad_contexts(obj: dict, path: Path) -> Iterator[str]:
    seen: set[str] = set()
    for ex in _squad_records(obj, path):
        if ex.context not in seen:
            seen.add(ex.context)
            yield ex.context


def _squad_records(obj: Any, path: Path) -> Iterator[QAExample]:
    if not _is_squad(obj):
        raise LmforgeError(f"{path}: not a SQuAD file (expected a top-level 'data' list)")
    skipped = 0
    for article in obj["data"]:
        title = article.get("title", "") if isinstance(article, dict) else ""
        for para in article.get("paragraphs", []) if isinstance(article, dict) else []:
            context = para.get("context") if isinstance(para, dict) else None
            if not isinstance(context, str):
                skipped += 1
                continue
            for qa in para.get("qas", []):
                question, qid = qa.get("question"), str(qa.get("id", ""))
                answers = [a for a in qa.get("answers", []) if isinstance(a, dict) and isinstance(a.get("text"), str)]
                if not isinstance(question, str) or not answers:
                    skipped += 1
                    log.warning("%s: example %s has no question or no answers; skipped", path, qid or "?")
                    continue
                yield QAExample(
                    id=qid,
                    question=question,
                    context=context,
                    answers=[a["text"] for a in answers],
                    answer_starts=[int(a.get("answer_start", -1)) for a in answers],
                    title=title,
                )
    if skipped:
        log.warning("%s: %d malformed SQuAD entries skipped", path, skipped)


def iter_file_documents(path: Path, fmt: str, text_field: str, counter: dict[str, int]) -> Iterator[str]:
    fmt = file_format(path, fmt)
    if fmt == "txt":
        yield _read_text(path, counter)
    elif fmt == "jsonl":
        yield from _iter_jsonl(path, text_field, counter)
    elif fmt in ("json", "squad"):
        yield from _iter_json(path, text_field, counter)
    elif fmt == "parquet":
        yield from _iter_parquet(path, text_field)
    elif fmt == "csv":
        yield from _iter_csv(path, text_field, counter)


# --------------------------------------------------------------------------- the Hub


def _hub_dataset(src: SourceConfig, local_hint: str):
    """Stream a Hub dataset; any failure to reach it becomes one clear error."""
    try:
        import datasets

        return datasets.load_dataset(src.hub, src.hub_config or None, split=src.split, streaming=True)
    except Exception as exc:  # network errors surface as many types from huggingface_hub/requests
        hint = f"; or put a copy matching '{src.local}' under --data-dir" if src.local else ""
        raise LmforgeError(
            f"source '{src.name}': Hugging Face dataset '{src.hub}' is not reachable "
            f"({type(exc).__name__}){local_hint}. Download it when online{hint}, "
            f"or set LMFORGE_DATA_DIR to a folder holding a local copy"
        ) from None


def _missing_error(src: SourceConfig, data_dir: Path | None) -> LmforgeError:
    where = f" under data dir {data_dir}" if data_dir else " (no --data-dir / LMFORGE_DATA_DIR given)"
    return LmforgeError(f"source '{src.name}': no local files match '{src.local}'{where}")


def iter_documents(src: SourceConfig, data_dir: Path | None) -> Iterator[str]:
    """Every document of a source, local copy first, Hub as fallback; capped by src.max_docs."""
    files = local_files(src, data_dir)
    counter: dict[str, int] = {}
    n = 0
    if not files and not src.hub and src.optional:
        log.warning("optional source '%s' skipped: no local files match '%s'", src.name, src.local)
        return
    if files:
        docs = (doc for f in files for doc in iter_file_documents(f, src.format, src.text_field, counter))
    elif src.hub:
        local_hint = f" and no local copy matches '{src.local}'" if src.local else ""
        ds = _hub_dataset(src, local_hint)
        if src.format == "squad":
            docs = _unique(rec["context"] for rec in ds)
        else:
            docs = (rec[src.text_field] for rec in ds if isinstance(rec.get(src.text_field), str))
    else:
        raise _missing_error(src, data_dir)
    for doc in docs:
        if not doc.strip():
            continue
        yield doc
        n += 1
        if src.max_docs and n >= src.max_docs:
            break
    if counter.get("replaced"):
        log.warning("source '%s': %d records had invalid UTF-8 (replaced)", src.name, counter["replaced"])
    if n == 0:
        raise LmforgeError(f"source '{src.name}': no text found in {', '.join(map(str, files)) or src.hub}")


def _unique(texts: Iterator[str]) -> Iterator[str]:
    seen: set[str] = set()
    for t in texts:
        if t not in seen:
            seen.add(t)
            yield t


def iter_qa_examples(src: SourceConfig, data_dir: Path | None) -> Iterator[QAExample]:
    """SQuAD-format QA examples from a local SQuAD json (nested) or the Hub's flat `rajpurkar/squad`."""
    files = local_files(src, data_dir)
    n = 0
    if files:
        counter: dict[str, int] = {}
        examples = (ex for f in files for ex in _squad_records(_load_json(f, counter), f))
    elif src.hub:
        ds = _hub_dataset(src, f" and no local copy matches '{src.local}'" if src.local else "")
        examples = (
            QAExample(id=str(r["id"]), question=r["question"], context=r["context"], title=r.get("title", ""),
                      answers=list(r["answers"]["text"]), answer_starts=list(r["answers"]["answer_start"]))
            for r in ds
        )
    else:
        raise _missing_error(src, data_dir)
    for ex in examples:
        yield ex
        n += 1
        if src.max_docs and n >= src.max_docs:
            break
    if n == 0:
        raise LmforgeError(f"QA source '{src.name}': no examples found")
