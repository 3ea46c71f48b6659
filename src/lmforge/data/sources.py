"""Read documents from local files (txt, jsonl, json, parquet, csv, SQuAD json; optionally .gz/.zst)
or, when no local copy exists, from the Hugging Face Hub.

Local copies are looked up first under the data dir (`--data-dir` or env LMFORGE_DATA_DIR), so the
same recipe runs offline against a mirror and online against the Hub.
"""

from __future__ import annotations

import csv
import glob
import gzip
import hashlib
import io
import json
import logging
import os
import re
import zlib
from collections import Counter
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
    """--data-dir, else $LMFORGE_DATA_DIR, else None (no local copies); one that does not exist is an error."""
    value = data_dir or os.environ.get("LMFORGE_DATA_DIR")
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        origin = "--data-dir" if data_dir else "LMFORGE_DATA_DIR"
        raise LmforgeError(f"{origin} {value}: no such directory")
    return path


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
        raise LmforgeError(
            f"{path}: unsupported file type (supported: {', '.join(SUPPORTED_SUFFIXES)}, optionally .gz/.zst)"
        )
    return suffix[1:]


def _is_supported(path: Path) -> bool:
    base, _ = _strip_compression(path.name)
    return Path(base).suffix.lower() in SUPPORTED_SUFFIXES


def local_files(src: SourceConfig, data_dir: Path | None) -> list[Path]:
    """Files matching the source's local glob. A relative glob is looked up under data_dir when one is given
    (and only there: the same recipe must not read other files depending on the current directory), else
    relative to the current directory; an absolute or ~ glob is used as given. Empty if none."""
    if not src.local:
        return []
    local = os.path.expanduser(src.local)
    candidates = [str(data_dir / local) if data_dir is not None and not Path(local).is_absolute() else local]
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
            raise LmforgeError(
                f"source '{src.name}': directory {pattern} has no supported files ({', '.join(SUPPORTED_SUFFIXES)})"
            )
    return []


class _ZstdReader(io.RawIOBase):
    """Every frame of a .zst file; EOFError when the file ends inside a frame, as gzip raises for a cut .gz.

    zstandard's `stream_reader` returns what it has when the input stops mid-frame (a truncated file reads as
    a shorter one, silently) and stops after the first frame; its `decompressobj` says when a frame is
    complete (`eof`), so each frame is read by its own."""

    def __init__(self, fh: BinaryIO):
        import zstandard

        self.fh, self.dctx, self.error = fh, zstandard.ZstdDecompressor(), zstandard.ZstdError
        self.frame = None  # the decompressor of the frame being read; None between frames
        self.out, self.pos = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.pos == len(self.out):
            raw = self.fh.read(1 << 16)  # small: the output of one read is held in memory
            if not raw:
                if self.frame is not None:
                    raise EOFError("compressed file ended before the end of a zstd frame")
                return 0
            self.out, self.pos = self._decompress(raw), 0
        n = min(len(buffer), len(self.out) - self.pos)
        buffer[:n] = self.out[self.pos : self.pos + n]
        self.pos += n
        return n

    def _decompress(self, raw: bytes) -> bytes:
        parts = []
        try:
            while raw:
                if self.frame is None:
                    self.frame = self.dctx.decompressobj()
                parts.append(self.frame.decompress(raw))
                raw = b""
                if self.frame.eof:  # the next frame, if any, starts in what this one left
                    raw, self.frame = self.frame.unused_data, None
        except self.error as exc:
            raise OSError(f"zstd: {exc}") from None
        return b"".join(parts)

    def close(self) -> None:
        self.fh.close()
        super().close()


def open_binary(path: Path) -> BinaryIO:
    try:
        if path.name.endswith(".gz"):
            return gzip.open(path, "rb")
        if path.name.endswith(".zst"):
            return io.BufferedReader(_ZstdReader(open(path, "rb")))  # buffered: read line by line
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


def _load_json(path: Path, counter: dict[str, int]) -> Any:
    try:
        return json.loads(_read_text(path, counter))
    except json.JSONDecodeError as exc:
        raise LmforgeError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno} ({exc.msg})") from None


def _is_squad(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("data"), list)


def _answer_start(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else -1


MAX_NAMED = 5  # ids named one by one in warnings; the rest are counted


def some_ids(ids: list[str]) -> str:
    """The first MAX_NAMED ids for a warning, and how many more there are."""
    more = f" and {len(ids) - MAX_NAMED} more" if len(ids) > MAX_NAMED else ""
    return ", ".join(ids[:MAX_NAMED]) + more


MALFORMED = "malformed entry (no context, question or answers)"  # how skipped entries are counted


def _squad_records(obj: Any, path: Path, skipped_count: Counter | None = None) -> Iterator[QAExample]:
    """QA examples of a nested SQuAD file. Malformed entries (not a dict, no context, no question, no
    answers) are skipped with a warning naming the example id, and counted in `skipped_count`; they never
    stop the run."""
    if not _is_squad(obj):
        raise LmforgeError(f"{path}: not a SQuAD file (expected a top-level 'data' list)")
    skipped: list[str] = []
    for a_i, article in enumerate(obj["data"]):
        article = article if isinstance(article, dict) else {}
        title = article.get("title", "") if isinstance(article.get("title"), str) else ""
        paragraphs = article.get("paragraphs") if isinstance(article.get("paragraphs"), list) else []
        for p_i, para in enumerate(paragraphs):
            para = para if isinstance(para, dict) else {}
            context = para.get("context")
            qas = para.get("qas") if isinstance(para.get("qas"), list) else []
            for q_i, qa in enumerate(qas):
                qa = qa if isinstance(qa, dict) else {}
                qid = str(qa.get("id") or f"{path.name}:{a_i}/{p_i}/{q_i}")  # a position names id-less entries
                question = qa.get("question")
                raw = qa.get("answers") if isinstance(qa.get("answers"), list) else []
                answers = [a for a in raw if isinstance(a, dict) and isinstance(a.get("text"), str)]
                if not isinstance(context, str) or not isinstance(question, str) or not answers:
                    skipped.append(qid)
                    if skipped_count is not None:  # counted at once: a reader may stop before the end
                        skipped_count[MALFORMED] += 1
                    continue
                yield QAExample(
                    id=qid,
                    question=question,
                    context=context,
                    answers=[a["text"] for a in answers],
                    answer_starts=[_answer_start(a.get("answer_start")) for a in answers],
                    title=title,
                )
    if skipped:
        log.warning(
            "%s: skipped %d malformed SQuAD entries (missing context, question or answers): %s",
            path,
            len(skipped),
            some_ids(skipped),
        )


# --------------------------------------------------------------------------- records: one dict per document

Record = dict[str, Any]
MAX_WARNINGS = 3  # per kind of problem and source; the rest are only counted


def text_hash(text: str) -> int:
    """A 64-bit content hash, stable across processes and runs (for exact-duplicate removal)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def _skip(stats: Counter, kind: str, where: str, message: str) -> None:
    stats[kind] += 1
    if stats[kind] <= MAX_WARNINGS:
        log.warning("%s: %s", where, message)


def _jsonl_records(path: Path, stats: Counter) -> Iterator[tuple[str, Record]]:
    with open_binary(path) as fh:
        try:
            for lineno, raw in enumerate(fh, 1):
                where = f"{path}:{lineno}"
                line = _decode(raw, path, f":{lineno}", stats).strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    _skip(stats, "bad_json", where, f"invalid JSON skipped ({exc.msg})")
                    continue
                if not isinstance(record, dict):
                    _skip(stats, "not_object", where, f"expected a JSON object, got {type(record).__name__}; skipped")
                    continue
                yield where, record
        except (OSError, EOFError, zlib.error) as exc:
            raise LmforgeError(f"{path}: corrupt or truncated file ({exc})") from None


def _json_records(path: Path, stats: Counter) -> Iterator[tuple[str, Record]]:
    obj = _load_json(path, stats)
    if _is_squad(obj):  # SQuAD file used as pretraining text: its paragraphs
        for article in obj["data"]:
            title = article.get("title", "") if isinstance(article, dict) else ""
            for para in article.get("paragraphs", []) if isinstance(article, dict) else []:
                if isinstance(para, dict) and isinstance(para.get("context"), str):
                    yield str(path), {"title": title, "context": para["context"], "text": para["context"]}
        return
    if not isinstance(obj, list):
        raise LmforgeError(f"{path}: expected a JSON list of records or a SQuAD file")
    for i, record in enumerate(obj):
        if isinstance(record, dict):
            yield f"{path}[{i}]", record
        else:
            _skip(stats, "not_object", f"{path}[{i}]", f"expected a JSON object, got {type(record).__name__}; skipped")


CSV_FIELD_LIMIT = 2**31 - 1  # a field is a whole document (a book); the csv module's default is 128 KiB


def _csv_records(path: Path, stats: Counter) -> Iterator[tuple[str, Record]]:
    """Rows of a CSV file, streamed; each line is decoded on its own so invalid UTF-8 is located."""
    csv.field_size_limit(CSV_FIELD_LIMIT)
    with open_binary(path) as fh:
        reader = csv.DictReader(_decode(raw, path, f":{n}", stats) for n, raw in enumerate(fh, 1))
        try:
            for row in reader:
                yield f"{path}:{reader.line_num}", row
        except csv.Error as exc:
            raise LmforgeError(f"{path}:{reader.reader.line_num}: malformed CSV ({exc})") from None
        except (OSError, EOFError, zlib.error) as exc:
            raise LmforgeError(f"{path}: corrupt or truncated file ({exc})") from None


def txt_unit(src: SourceConfig, n_files: int) -> str:
    """How the source's txt files are cut into documents: `sample_by`, with "auto" resolved (one document per
    file, but paragraphs for a single-file corpus such as tinyshakespeare, which could not otherwise be split)."""
    if src.sample_by != "auto":
        return src.sample_by
    return "paragraph" if n_files == 1 else "document"


def whole_txt_documents(src: SourceConfig, data_dir: Path | None) -> bool:
    """Whether the source has local txt files read as one document each."""
    files = local_files(src, data_dir)
    return txt_unit(src, len(files)) == "document" and any(file_format(f, src.format) == "txt" for f in files)


def _txt_records(path: Path, src: SourceConfig, stats: Counter, unit: str) -> Iterator[tuple[str, Record]]:
    """A txt file as documents (`unit`, as the `sample_by` of Hugging Face datasets' text loader): the whole
    file, or its paragraphs (runs of non-blank lines) or non-blank lines, streamed line by line."""
    if unit == "document":
        yield str(path), {src.text_field: _read_text(path, stats), "path": str(path)}
        return
    with open_binary(path) as fh:
        try:
            lines: list[str] = []
            first = 0
            for lineno, raw in enumerate(fh, 1):
                line = _decode(raw, path, f":{lineno}", stats).rstrip("\r\n")
                if line.strip():
                    first = first or lineno
                    lines.append(line)
                if lines and (unit == "line" or not line.strip()):
                    yield f"{path}:{first}", {src.text_field: "\n".join(lines), "path": str(path)}
                    lines, first = [], 0
            if lines:
                yield f"{path}:{first}", {src.text_field: "\n".join(lines), "path": str(path)}
        except (OSError, EOFError, zlib.error) as exc:
            raise LmforgeError(f"{path}: corrupt or truncated file ({exc})") from None


def _datasets_records(ds: Any, where: str, on_error: str) -> Iterator[tuple[str, Record]]:
    """Rows of a streaming `datasets.IterableDataset` (the Hub and local parquet alike)."""
    i = 0
    try:
        for i, record in enumerate(ds):
            yield f"{where}[row {i}]", record
    except LmforgeError:
        raise
    except Exception as exc:  # datasets/pyarrow/fsspec raise many types for a broken file or a dropped connection
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise LmforgeError(
            f"{where}: reading failed at row {i} ({type(exc).__name__}: {first_line}){on_error}"
        ) from None


def _parquet_records(path: Path) -> Iterator[tuple[str, Record]]:
    import datasets

    try:
        ds = datasets.load_dataset("parquet", data_files=[str(path)], split="train", streaming=True)
    except Exception as exc:  # a malformed file surfaces as several pyarrow/datasets types
        raise LmforgeError(f"{path}: not a readable parquet file ({type(exc).__name__})") from None
    yield from _datasets_records(ds, str(path), "")


def file_records(path: Path, src: SourceConfig, stats: Counter, n_files: int = 1) -> Iterator[tuple[str, Record]]:
    """(where, record) for every record of one local file (one of the source's `n_files`); `where` is the file
    and line or row."""
    fmt = file_format(path, src.format)
    if fmt == "txt":
        return _txt_records(path, src, stats, txt_unit(src, n_files))
    if fmt == "jsonl":
        return _jsonl_records(path, stats)
    if fmt in ("json", "squad"):
        return _json_records(path, stats)
    if fmt == "parquet":
        return _parquet_records(path)
    return _csv_records(path, stats)


# --------------------------------------------------------------------------- records -> documents


def _record_text(record: Record, src: SourceConfig, where: str, stats: Counter) -> str | None:
    if src.template:
        try:
            return src.template.format_map(record)
        except KeyError as exc:
            _skip(stats, "missing_field", where, f"no field {exc} for the source's template; record skipped")
            return None
    field = "context" if src.format == "squad" else src.text_field
    value = record.get(field)
    if not isinstance(value, str):
        _skip(stats, "missing_field", where, f"no string field '{field}'; record skipped")
        return None
    return value


_SURROGATE = re.compile("[\ud800-\udfff]")


def without_lone_surrogates(text: str) -> str:
    """`text` with lone surrogates (JSON escapes such as "\\ud800", which no UTF-8 text can hold and the
    tokenizer refuses) replaced with U+FFFD; `text` itself when it has none."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)


def _valid_unicode(text: str, where: str, stats: Counter) -> str:
    """`text` without lone surrogates, each record that had some counted like invalid UTF-8 bytes."""
    valid = without_lone_surrogates(text)
    if valid is not text:
        _skip(stats, "surrogates", where, "lone surrogate escapes (\\ud800-\\udfff) replaced with U+FFFD")
    return valid


def _keep(record: Record, text: str, src: SourceConfig, stats: Counter) -> bool:
    """The source's filters; every drop is counted by reason."""
    if not text.strip():
        stats["empty"] += 1
        return False
    if len(text) < src.min_chars:
        stats["too_short"] += 1
        return False
    if src.max_chars and len(text) > src.max_chars:
        stats["too_long"] += 1
        return False
    if src.score_field:
        score = record.get(src.score_field)
        if score is None:
            stats["unscored"] += 1  # a local stand-in without the Hub's score column: kept
        elif isinstance(score, bool) or not isinstance(score, (int, float)) or score < src.min_score:
            stats["low_score"] += 1
            return False
    if src.languages:
        language = record.get(src.language_field)
        if language is None:
            stats["unlabelled"] += 1  # as for the score: a stand-in without the column is kept
        elif language not in src.languages:
            stats["other_language"] += 1
            return False
    return True


def source_records(src: SourceConfig, data_dir: Path | None, stats: Counter) -> Iterator[tuple[str, Record]] | None:
    """The records of a source: its local files if any match, else the Hub; None for a missing optional source."""
    files = local_files(src, data_dir)
    if files:
        return (item for f in files for item in file_records(f, src, stats, len(files)))
    if src.hub:
        local_hint = f" and no local copy matches '{src.local}'" if src.local else ""
        on_error = "; point the source's 'local' at a copy under --data-dir to work offline"
        return _datasets_records(_hub_dataset(src, local_hint), src.hub, on_error)
    if src.optional:
        log.warning("optional source '%s' skipped: no local files match '%s'", src.name, src.local)
        return None
    raise _missing_error(src, data_dir)


DROP_REASONS = (
    "bad_json",
    "not_object",
    "missing_field",
    "empty",
    "too_short",
    "too_long",
    "low_score",
    "other_language",
)


def _log_summary(src: SourceConfig, stats: Counter) -> None:
    dropped = {k: stats[k] for k in DROP_REASONS if stats.get(k)}
    if dropped:
        log.warning(
            "source '%s': %d records dropped (%s); %d documents kept",
            src.name,
            sum(dropped.values()),
            ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in dropped.items()),
            stats["docs"],
        )
    if stats.get("replaced"):
        log.warning("source '%s': %d records had invalid UTF-8 (replaced with U+FFFD)", src.name, stats["replaced"])
    if stats.get("surrogates"):
        log.warning(
            "source '%s': %d records had lone surrogate escapes (replaced with U+FFFD)", src.name, stats["surrogates"]
        )
    for kind, column in (("unscored", src.score_field), ("unlabelled", src.language_field)):
        if stats.get(kind):
            log.warning("source '%s': %d records have no '%s' column; kept unfiltered", src.name, stats[kind], column)


def iter_documents(src: SourceConfig, data_dir: Path | None, stats: Counter | None = None) -> Iterator[str]:
    """Every document of a source (local copy first, the Hub as fallback) after its template and filters,
    capped by src.max_docs. Counts of what was read and dropped go into `stats`."""
    stats = stats if stats is not None else Counter()
    records = source_records(src, data_dir, stats)
    if records is None:
        return
    seen: set[int] = set()
    n = 0
    for where, record in records:
        stats["records"] += 1
        text = _record_text(record, src, where, stats)
        if text is None:
            continue
        text = _valid_unicode(text, where, stats)
        if not _keep(record, text, src, stats):
            continue
        if src.format == "squad":  # one row per question: keep each paragraph once
            h = text_hash(text)
            if h in seen:
                continue
            seen.add(h)
        yield text
        n += 1
        stats["docs"] = n
        if src.max_docs and n >= src.max_docs:
            break
    _log_summary(src, stats)
    if n == 0:
        where = src.hub if not local_files(src, data_dir) else src.local
        raise LmforgeError(
            f"source '{src.name}': no documents in {where} ({stats['records']} records read, "
            "none passed the text field and filters)"
        )


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


def iter_qa_examples(src: SourceConfig, data_dir: Path | None, skipped: Counter | None = None) -> Iterator[QAExample]:
    """SQuAD-format QA examples from a local SQuAD json (nested) or the Hub's flat `rajpurkar/squad`; the
    malformed entries of a local file are left out and counted in `skipped` (see MALFORMED)."""
    files = local_files(src, data_dir)
    n = 0
    if files:
        counter: dict[str, int] = {}
        examples = (ex for f in files for ex in _squad_records(_load_json(f, counter), f, skipped))
    elif src.hub:
        ds = _hub_dataset(src, f" and no local copy matches '{src.local}'" if src.local else "")
        examples = (
            QAExample(
                id=str(r["id"]),
                question=r["question"],
                context=r["context"],
                title=r.get("title", ""),
                answers=list(r["answers"]["text"]),
                answer_starts=list(r["answers"]["answer_start"]),
            )
            for r in ds
        )
    else:
        raise _missing_error(src, data_dir)
    repaired: list[str] = []
    for ex in examples:
        valid = _qa_without_lone_surrogates(ex)
        if valid is not ex:
            repaired.append(valid.id)
        yield valid
        n += 1
        if src.max_docs and n >= src.max_docs:
            break
    if repaired:
        log.warning(
            "QA source '%s': %d example(s) had lone surrogate escapes (\\ud800-\\udfff), replaced with U+FFFD: %s",
            src.name,
            len(repaired),
            some_ids(repaired),
        )
    if n == 0:
        raise LmforgeError(f"QA source '{src.name}': no examples found")


def _qa_without_lone_surrogates(ex: QAExample) -> QAExample:
    """`ex` with lone surrogates replaced in its text fields (the tokenizer refuses them); `ex` itself when it
    has none."""
    fields = (ex.id, ex.question, ex.context, ex.title, *ex.answers)
    valid = [without_lone_surrogates(t) for t in fields]
    if all(a is b for a, b in zip(valid, fields, strict=True)):
        return ex
    qid, question, context, title, *answers = valid
    return QAExample(qid, question, context, answers, ex.answer_starts, title)
