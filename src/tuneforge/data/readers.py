"""Read tabular training data (CSV, TSV, JSON, JSONL, Parquet, plain text) into a `Table`.

Every reader returns the same shape: column names, one dict per record and the 1-based line where
each record starts, so that later validation (a missing column, an empty text, a bad label) can name
the exact file and line. Text formats may be gzip-compressed (``foo.jsonl.gz``).

We use the stdlib ``csv``/``json`` modules and ``pyarrow.parquet`` rather than
``datasets.load_dataset`` on purpose: ``load_dataset`` loses line numbers (its errors point into
Arrow internals or a cache file, not the user's file), caches to disk, and hides the CSV dialect.
We need exact quoting control -- SST-2 style TSVs contain bare ``"`` characters that must be read
with ``csv.QUOTE_NONE`` -- and every malformed record reported as ``FILE:LINE: message``.
"""

from __future__ import annotations

import csv
import difflib
import gzip
import io
import json
import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge.errors import ConfigError, DataError
from tuneforge.models.hub import HF_SCHEME, read_hub_dataset

__all__ = ["FORMATS", "Table", "column_values", "detect_format", "read_lines", "read_table", "resolve_column"]

FORMATS = ("csv", "tsv", "json", "jsonl", "parquet", "txt")

_EXTENSIONS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".txt": "txt",
    ".text": "txt",
}
_GZIP_MAGIC = b"\x1f\x8b"
_WS = re.compile(r"[ \t\n\r]*")
_MISSING = object()


@dataclass
class Table:
    """Records read from one file; ``lines[i]`` is the 1-based line where ``rows[i]`` starts."""

    path: Path
    columns: list[str]
    rows: list[dict[str, Any]]
    lines: list[int]

    def __len__(self) -> int:
        return len(self.rows)


# --------------------------------------------------------------------------- format detection


def detect_format(path: Path, fmt: str | None = None) -> str:
    """Return the format of ``path``: ``fmt`` if given (validated), else from the file extension."""
    if fmt is not None:
        name = str(fmt).strip().lower()
        if name not in FORMATS:
            raise ConfigError(
                f"unknown data format {fmt!r}; allowed: {', '.join(FORMATS)}", key="data.format"
            )
        return name
    suffixes = [s.lower() for s in Path(path).suffixes]
    gz = bool(suffixes) and suffixes[-1] == ".gz"
    ext = (suffixes[-2] if len(suffixes) >= 2 else "") if gz else (suffixes[-1] if suffixes else "")
    found = _EXTENSIONS.get(ext)
    if found == "parquet" and gz:
        raise DataError("gzip-compressed parquet is not supported; parquet is already compressed", path)
    if found is None:
        allowed = ", ".join(sorted(_EXTENSIONS)) + " (text formats also as .gz)"
        raise DataError(
            f"cannot tell the data format from the file name; known extensions: {allowed}. "
            f"Set data.format to one of: {', '.join(FORMATS)}",
            path,
        )
    return found


# --------------------------------------------------------------------------- public entry points


def read_table(
    path: str | Path,
    fmt: str | None = None,
    *,
    header: bool = True,
    quoting: bool = True,
    delimiter: str | None = None,
    encoding: str = "utf-8",
    extra_fields: str = "error",
) -> Table:
    """Read ``path`` into a `Table`.

    ``header``, ``quoting``, ``delimiter`` and ``extra_fields`` (``drop``: a row with more fields than the
    header keeps the first ones; ``error``: it is malformed) apply to csv/tsv only (``quoting=False`` means
    ``csv.QUOTE_NONE``). Raises `DataError` (with file and line) for any unreadable or malformed input.
    ``hf://org/dataset[:split]`` reads a Hugging Face Hub data set through ``datasets`` (from the local cache
    when offline, see `tuneforge.models.hub`); its "lines" are 1-based row numbers.
    """
    if HF_SCHEME.match(str(path)):
        columns, rows = read_hub_dataset(path)
        if not rows:
            raise DataError("the data set split is empty", path)
        return Table(Path(path), columns, rows, list(range(1, len(rows) + 1)))
    path = Path(path)
    name = detect_format(path, fmt)
    data = _read_bytes(path)
    if name == "parquet":
        return _read_parquet(path)
    text = _decode(_maybe_gunzip(data, path), path, encoding)
    if not text.strip():
        raise DataError("file is empty (only whitespace)", path)
    if name in ("csv", "tsv"):
        sep = delimiter if delimiter is not None else ("," if name == "csv" else "\t")
        return _read_delimited(path, text, name, sep, header=header, quoting=quoting, extra_fields=extra_fields)
    if name == "jsonl":
        return _read_jsonl(path, text)
    if name == "json":
        return _read_json(path, text)
    return _read_txt(path, text)


def read_lines(path: str | Path, encoding: str = "utf-8") -> list[str]:
    """Every line of a text file (gzip read transparently), blank lines kept so that line ``i`` of two
    line-aligned files stays example ``i``; only the newline at the end of the file adds no line."""
    path = Path(path)
    text = _decode(_maybe_gunzip(_read_bytes(path), path), path, encoding)
    lines = [line for _, line in _split_lines(text)]
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise DataError("file is empty", path)
    return lines


def resolve_column(table: Table, spec: str | int, role: str) -> str:
    """Return the column name meant by ``spec``: a name, or a 0-based index (int or digit string)."""
    columns = table.columns
    if isinstance(spec, str) and spec in columns:
        return spec
    index: int | None = None
    if isinstance(spec, int) and not isinstance(spec, bool):
        index = spec
    elif isinstance(spec, str) and spec.strip().isdigit():
        index = int(spec.strip())
    available = ", ".join(columns)
    if index is not None:
        if 0 <= index < len(columns):
            return columns[index]
        raise DataError(
            f"{role} index {index} out of range; the file has {len(columns)} columns: {available}",
            table.path,
        )
    message = f"{role} {spec!r} not found; available columns: {available}"
    close = difflib.get_close_matches(str(spec), columns, n=1)
    if close:
        message += f" (did you mean {close[0]!r}?)"
    raise DataError(message, table.path)


def column_values(table: Table, column: str, *, role: str, allow_empty: bool = False) -> list:
    """Values of ``column`` in row order.

    With ``allow_empty=False`` a missing key, a ``None`` or a blank string is a `DataError` naming the
    row's line. With ``allow_empty=True`` they are passed through (a missing key as ``None``).
    """
    values = []
    for row, line in zip(table.rows, table.lines, strict=True):
        value = row.get(column, _MISSING)
        if not allow_empty:
            problem = _empty_problem(value)
            if problem:
                raise DataError(f"{problem} {role} {column!r}", table.path, line)
        values.append(None if value is _MISSING else value)
    return values


def _empty_problem(value: Any) -> str | None:
    if value is _MISSING:
        return "missing"
    if value is None:
        return "null"
    if isinstance(value, str) and not value.strip():
        return "empty"
    return None


# --------------------------------------------------------------------------- bytes and text


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise DataError("file not found", path)
    if path.is_dir():
        raise DataError("is a directory, expected a data file", path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read file: {e.strerror or e}", path) from e
    if not data:
        raise DataError("file is empty", path)
    return data


def _maybe_gunzip(data: bytes, path: Path) -> bytes:
    if not (data[:2] == _GZIP_MAGIC or path.suffix.lower() == ".gz"):
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot decompress gzip file: {e}", path) from e


def _decode(data: bytes, path: Path, encoding: str) -> str:
    try:
        text = data.decode(encoding)
    except LookupError as e:
        raise ConfigError(f"unknown text encoding {encoding!r}", key="data.encoding") from e
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"not valid {encoding} text ({e.reason} at byte {e.start}); re-save the file as {encoding}",
            path,
            line,
        ) from e
    return text.removeprefix("\ufeff")


def _split_lines(text: str) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, line) splitting on newlines only (not str.splitlines' U+2028 etc.)."""
    for number, line in enumerate(text.split("\n"), start=1):
        yield number, line.removesuffix("\r")


def _union_columns(rows: Iterable[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            seen.setdefault(key, None)
    return list(seen)


# --------------------------------------------------------------------------- csv / tsv


def _read_delimited(path: Path, text: str, fmt: str, delimiter: str, *, header: bool, quoting: bool,
                    extra_fields: str = "error") -> Table:
    if len(delimiter) != 1:
        raise ConfigError(f"delimiter must be one character, got {delimiter!r}", key="data.delimiter")
    records = _csv_records(path, text, fmt, delimiter, quoting)
    columns: list[str] | None = None
    header_line = 0
    if header:
        header_line, names = next(records, (0, []))
        columns = _check_header(path, [n.strip() for n in names], header_line)
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    for line, record in records:
        if columns is None:
            columns, header_line = [str(i) for i in range(len(record))], line
        if len(record) > len(columns) and extra_fields == "drop":
            record = record[: len(columns)]
        if len(record) != len(columns):
            what = f"the header (line {header_line})" if header else f"the first row (line {header_line})"
            raise DataError(
                f"row has {len(record)} fields but {what} has {len(columns)}; "
                f"check the delimiter {delimiter!r}{' and quoting' if quoting else ''}"
                f"{' (or data.extra_fields=drop)' if len(record) > len(columns) else ''}",
                path,
                line,
            )
        rows.append(dict(zip(columns, record, strict=True)))
        lines.append(line)
    if not rows:
        raise DataError("no data rows (only a header)" if header else "no data rows", path)
    return Table(path, columns or [], rows, lines)


def _csv_records(
    path: Path, text: str, fmt: str, delimiter: str, quoting: bool
) -> Iterator[tuple[int, list[str]]]:
    """Yield (start line, fields) for each non-blank record; csv's line_num is the END line."""
    reader = csv.reader(
        io.StringIO(text, newline=""),
        delimiter=delimiter,
        quoting=csv.QUOTE_MINIMAL if quoting else csv.QUOTE_NONE,
        strict=quoting,
    )
    end = 0
    while True:
        start = end + 1
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            hint = "; if the text contains bare quote characters, set data.quoting: false" if quoting else ""
            raise DataError(f"malformed {fmt.upper()} record: {e}{hint}", path, start) from e
        end = reader.line_num
        if not record or (len(record) == 1 and not record[0].strip()):
            continue
        yield start, record


def _check_header(path: Path, names: list[str], line: int) -> list[str]:
    if not names:
        raise DataError("file is empty", path)
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DataError(f"duplicate column name {name!r} in the header", path, line)
        seen.add(name)
    return names


# --------------------------------------------------------------------------- jsonl / json


def _read_jsonl(path: Path, text: str) -> Table:
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    for number, line in _split_lines(text):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", path, number) from e
        if not isinstance(value, dict):
            raise DataError(f"expected a JSON object on each line, got {_json_type(value)}", path, number)
        rows.append(value)
        lines.append(number)
    return Table(path, _union_columns(rows), rows, lines)


def _read_json(path: Path, text: str) -> Table:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", path, e.lineno) from e
    start = _WS.match(text).end()
    if isinstance(document, dict):
        start = _records_offset(path, text, start)
    elif not isinstance(document, list):
        raise DataError(_SHAPE_HINT + f", got {_json_type(document)}", path)
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    for line, value in _array_elements(text, start):
        if not isinstance(value, dict):
            raise DataError(f"expected each record to be a JSON object, got {_json_type(value)}", path, line)
        rows.append(value)
        lines.append(line)
    if not rows:
        raise DataError("no data rows (the JSON array is empty)", path)
    return Table(path, _union_columns(rows), rows, lines)


_SHAPE_HINT = 'expected a JSON array of objects, or an object holding one such array (e.g. {"data": [...]})'


def _records_offset(path: Path, text: str, start: int) -> int:
    """Offset of the '[' of the single list value in the top-level object at ``start``."""
    decoder = json.JSONDecoder()
    found: list[tuple[str, int]] = []
    idx = _WS.match(text, start + 1).end()  # after '{'
    while text[idx] != "}":
        key, idx = decoder.raw_decode(text, idx)
        idx = _WS.match(text, _WS.match(text, idx).end() + 1).end()  # skip ':'
        value_at = idx
        value, idx = decoder.raw_decode(text, idx)
        if isinstance(value, list):
            found.append((key, value_at))
        idx = _WS.match(text, idx).end()
        if text[idx] == ",":
            idx = _WS.match(text, idx + 1).end()
    if len(found) != 1:
        keys = ", ".join(repr(k) for k, _ in found) or "none"
        raise DataError(f"{_SHAPE_HINT}; top-level object has {len(found)} list values ({keys})", path)
    return found[0][1]


def _array_elements(text: str, start: int) -> Iterator[tuple[int, Any]]:
    """Yield (start line, value) for each element of the valid JSON array whose '[' is at ``start``."""
    decoder = json.JSONDecoder()
    line, counted = 1, 0
    idx = _WS.match(text, start + 1).end()
    while text[idx] != "]":
        line += text.count("\n", counted, idx)
        counted = idx
        value, idx = decoder.raw_decode(text, idx)
        yield line, value
        idx = _WS.match(text, idx).end()
        if text[idx] == ",":
            idx = _WS.match(text, idx + 1).end()


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


# --------------------------------------------------------------------------- parquet / txt


def _read_parquet(path: Path) -> Table:
    import pyarrow.parquet as pq  # imported lazily: pyarrow is heavy and only needed here

    try:
        arrow = pq.read_table(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
        raise DataError(f"cannot read parquet file: {e}", path) from e
    rows = arrow.to_pylist()
    if not rows:
        raise DataError("no data rows", path)
    return Table(path, list(arrow.column_names), rows, list(range(1, len(rows) + 1)))


def _read_txt(path: Path, text: str) -> Table:
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    for number, line in _split_lines(text):
        if line.strip():
            rows.append({"text": line})
            lines.append(number)
    return Table(path, ["text"], rows, lines)
