"""Unit tests for tuneforge.data.readers: every format, and every error naming file and line."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from tuneforge.data.readers import (
    FORMATS,
    Table,
    column_values,
    detect_format,
    read_table,
    resolve_column,
)
from tuneforge.errors import ConfigError, DataError

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def data_error(path: Path, **kwargs) -> DataError:
    with pytest.raises(DataError) as info:
        read_table(path, **kwargs)
    assert path.name in str(info.value)
    return info.value


# --------------------------------------------------------------------------- formats


def test_formats_constant():
    assert FORMATS == ("csv", "tsv", "json", "jsonl", "parquet", "txt")


def test_csv_with_header(tmp_path):
    path = write(tmp_path, "d.csv", 'sentence,label\n"hello, world",1\nbye,0\n')
    table = read_table(path)
    assert isinstance(table, Table)
    assert table.path == path
    assert table.columns == ["sentence", "label"]
    assert table.rows == [{"sentence": "hello, world", "label": "1"}, {"sentence": "bye", "label": "0"}]
    assert table.lines == [2, 3]
    assert len(table) == 2


def test_csv_without_header(tmp_path):
    path = write(tmp_path, "d.csv", "a,1\nb,0\n")
    table = read_table(path, header=False)
    assert table.columns == ["0", "1"]
    assert table.rows[1] == {"0": "b", "1": "0"}
    assert table.lines == [1, 2]


def test_csv_multiline_quoted_field_reports_start_line(tmp_path):
    path = write(tmp_path, "d.csv", 'text,label\n"line one\nline two",1\n\nnext,0\n')
    table = read_table(path)
    assert table.rows[0]["text"] == "line one\nline two"
    assert table.lines == [2, 5]


def test_csv_crlf_bom_and_blank_lines(tmp_path):
    path = write(tmp_path, "d.csv", "\ufeffa,b\r\n\r\n1,2\r\n   \r\n3,4\r\n")
    table = read_table(path)
    assert table.columns == ["a", "b"]
    assert table.rows == [{"a": "1", "b": "2"}, {"a": "3", "b": "4"}]
    assert table.lines == [3, 5]


def test_tsv_quoting_off_keeps_bare_quotes(tmp_path):
    content = 'sentence\tlabel\n" a quote starts here\t1\nplain "middle" text\t0\n'
    path = write(tmp_path, "d.tsv", content)
    table = read_table(path, quoting=False)
    assert [r["sentence"] for r in table.rows] == ['" a quote starts here', 'plain "middle" text']
    assert table.lines == [2, 3]


def test_tsv_quoting_on_unterminated_quote_is_an_error(tmp_path):
    path = write(tmp_path, "d.tsv", 'sentence\tlabel\nok\t1\n" unterminated\t1\nmore\t0\n')
    err = data_error(path)
    assert err.line == 3
    assert "quoting" in str(err)


def test_tsv_tab_extension_and_delimiter_override(tmp_path):
    assert read_table(write(tmp_path, "d.tab", "a\tb\n1\t2\n")).rows == [{"a": "1", "b": "2"}]
    table = read_table(write(tmp_path, "d.csv", "a;b\n1;2\n"), delimiter=";")
    assert table.rows == [{"a": "1", "b": "2"}]


def test_tsv_header_less(tmp_path):
    path = write(tmp_path, "d.tsv", "x\t1\ny\t0\n")
    table = read_table(path, header=False)
    assert table.columns == ["0", "1"]
    assert len(table) == 2


def test_gz_text_formats(tmp_path):
    csv_path = write(tmp_path, "d.csv.gz", gzip.compress(b"a,b\n1,2\n"))
    assert read_table(csv_path).rows == [{"a": "1", "b": "2"}]
    jsonl_path = write(tmp_path, "d.jsonl.gz", gzip.compress(b'{"t": "x"}\n\n{"t": "y"}\n'))
    table = read_table(jsonl_path)
    assert table.rows == [{"t": "x"}, {"t": "y"}]
    assert table.lines == [1, 3]
    txt_path = write(tmp_path, "d.txt.gz", gzip.compress(b"one\ntwo\n"))
    assert [r["text"] for r in read_table(txt_path).rows] == ["one", "two"]


def test_gz_with_explicit_format(tmp_path):
    path = write(tmp_path, "blob.data", gzip.compress(b"a\tb\n1\t2\n"))
    assert read_table(path, "tsv").rows == [{"a": "1", "b": "2"}]


def test_jsonl_union_of_columns(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"a": 1}\n\n{"b": "x", "a": 2}\n')
    table = read_table(path)
    assert table.columns == ["a", "b"]
    assert table.rows == [{"a": 1}, {"b": "x", "a": 2}]
    assert table.lines == [1, 3]


def test_jsonl_unicode_line_separator_inside_string(tmp_path):
    path = write(tmp_path, "d.ndjson", '{"t": "a\u2028b"}\n{"t": "c"}\n')
    table = read_table(path)
    assert [r["t"] for r in table.rows] == ["a\u2028b", "c"]
    assert table.lines == [1, 2]


def test_json_array_pretty_printed_lines(tmp_path):
    records = [{"text": "a", "label": 0}, {"text": "b\nc", "label": 1}, {"text": "d", "label": 0}]
    path = write(tmp_path, "d.json", json.dumps(records, indent=2))
    # indent=2: line 1 '[', each element spans 4 lines starting with '  {'.
    table = read_table(path)
    assert table.rows == records
    assert table.columns == ["text", "label"]
    assert table.lines == [2, 6, 10]


def test_json_object_holding_records(tmp_path):
    content = '{\n  "version": "1.0",\n  "data": [\n    {"t": "x"},\n\n    {"t": "y",\n     "u": 1}\n  ]\n}\n'
    table = read_table(write(tmp_path, "d.json", content))
    assert table.rows == [{"t": "x"}, {"t": "y", "u": 1}]
    assert table.columns == ["t", "u"]
    assert table.lines == [4, 6]


def test_json_compact_single_line(tmp_path):
    table = read_table(write(tmp_path, "d.json", '[{"a": 1}, {"a": 2}]'))
    assert table.lines == [1, 1]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a", "b", "c"], "label": [0, 1, 0]}), path)
    table = read_table(path)
    assert table.columns == ["text", "label"]
    assert table.rows[1] == {"text": "b", "label": 1}
    assert table.lines == [1, 2, 3]


def test_parquet_unreadable(tmp_path):
    path = write(tmp_path, "d.pq", b"this is not parquet")
    assert "parquet" in str(data_error(path))


def test_txt(tmp_path):
    path = write(tmp_path, "d.txt", "first line\r\n\n  second  \nthird")
    table = read_table(path)
    assert table.columns == ["text"]
    assert [r["text"] for r in table.rows] == ["first line", "  second  ", "third"]
    assert table.lines == [1, 3, 4]


# --------------------------------------------------------------------------- detect_format


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("a.csv", "csv"),
        ("a.TSV", "tsv"),
        ("a.tab", "tsv"),
        ("a.json", "json"),
        ("a.jsonl", "jsonl"),
        ("a.ndjson", "jsonl"),
        ("a.parquet", "parquet"),
        ("a.pq", "parquet"),
        ("a.txt", "txt"),
        ("a.text", "txt"),
        ("a.jsonl.gz", "jsonl"),
        ("a.txt.gz", "txt"),
        ("my.data.v2.csv.gz", "csv"),
    ],
)
def test_detect_format_by_extension(name, fmt):
    assert detect_format(Path(name)) == fmt


def test_detect_format_explicit_overrides_extension():
    assert detect_format(Path("a.dat"), "jsonl") == "jsonl"


def test_unknown_extension(tmp_path):
    path = write(tmp_path, "d.xlsx", "whatever")
    err = data_error(path)
    assert "data.format" in str(err)
    assert ".csv" in str(err) and ".jsonl" in str(err)


def test_unknown_data_format(tmp_path):
    path = write(tmp_path, "d.csv", "a\n1\n")
    with pytest.raises(ConfigError) as info:
        read_table(path, "excel")
    message = str(info.value)
    assert info.value.key == "data.format"
    assert "'data.format'" in message and "excel" in message
    assert "csv, tsv, json, jsonl, parquet, txt" in message


# --------------------------------------------------------------------------- columns


def test_resolve_column_by_name_and_index(tmp_path):
    table = read_table(write(tmp_path, "d.csv", "sentence,label\nhi,1\n"))
    assert resolve_column(table, "label", "label column") == "label"
    assert resolve_column(table, 0, "text column") == "sentence"
    assert resolve_column(table, "1", "label column") == "label"


def test_resolve_column_digit_name_wins_over_index(tmp_path):
    table = read_table(write(tmp_path, "d.csv", "x,1,0\na,b,c\n"))
    assert resolve_column(table, "1", "text column") == "1"
    assert resolve_column(table, 1, "text column") == "1"
    assert resolve_column(table, "2", "text column") == "0"


def test_resolve_column_header_less_index(tmp_path):
    table = read_table(write(tmp_path, "d.tsv", "hi\t1\n"), header=False)
    assert column_values(table, resolve_column(table, 1, "label column"), role="label column") == ["1"]


def test_missing_column(tmp_path):
    path = write(tmp_path, "d.csv", "sentence,label\nhi,1\n")
    table = read_table(path)
    with pytest.raises(DataError) as info:
        resolve_column(table, "sentense", "text column")
    message = str(info.value)
    assert path.name in message
    assert "text column 'sentense' not found; available columns: sentence, label" in message


def test_column_index_out_of_range(tmp_path):
    path = write(tmp_path, "d.csv", "sentence,label\nhi,1\n")
    with pytest.raises(DataError) as info:
        resolve_column(read_table(path), 5, "label column")
    assert path.name in str(info.value) and "out of range" in str(info.value)


def test_empty_text_value(tmp_path):
    path = write(tmp_path, "d.csv", "sentence,label\nhi,1\n   ,0\n")
    table = read_table(path)
    with pytest.raises(DataError) as info:
        column_values(table, "sentence", role="text column")
    assert info.value.line == 3
    assert f"{path.name}:3:" in str(info.value)
    assert "empty text column 'sentence'" in str(info.value)
    assert column_values(table, "sentence", role="text column", allow_empty=True) == ["hi", "   "]


def test_jsonl_missing_key_and_null(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"t": "a", "y": 1}\n{"t": "b"}\n{"t": null, "y": 0}\n')
    table = read_table(path)
    with pytest.raises(DataError) as info:
        column_values(table, "y", role="label column")
    assert f"{path.name}:2:" in str(info.value) and "label column 'y'" in str(info.value)
    with pytest.raises(DataError) as info:
        column_values(table, "t", role="text column")
    assert f"{path.name}:3:" in str(info.value)
    assert column_values(table, "y", role="label column", allow_empty=True) == [1, None, 0]


# --------------------------------------------------------------------------- errors


def test_ragged_row(tmp_path):
    path = write(tmp_path, "d.csv", "a,b\n1,2\n3,4,5\n")
    err = data_error(path)
    assert err.line == 3
    assert f"{path.name}:3:" in str(err)
    assert "3 fields" in str(err) and "has 2" in str(err)


def test_ragged_row_header_less(tmp_path):
    path = write(tmp_path, "d.tsv", "a\t1\nb\n")
    err = data_error(path, header=False)
    assert err.line == 2 and "first row" in str(err)


def test_duplicate_header(tmp_path):
    path = write(tmp_path, "d.csv", "text,text\na,b\n")
    err = data_error(path)
    assert err.line == 1 and "duplicate" in str(err)


def test_bad_encoding_names_line(tmp_path):
    path = write(tmp_path, "d.csv", b"a,b\nok,1\nbad \xff\xfe byte,0\nfine,1\n")
    err = data_error(path)
    assert err.line == 3
    assert f"{path.name}:3:" in str(err)
    assert "utf-8" in str(err)


def test_other_encoding(tmp_path):
    path = write(tmp_path, "d.txt", "caf\u00e9\n".encode("latin-1"))
    assert read_table(path, encoding="latin-1").rows == [{"text": "caf\u00e9"}]


@pytest.mark.parametrize("content", [b"", b"  \n\n \t\n"])
@pytest.mark.parametrize("name", ["d.csv", "d.jsonl", "d.json", "d.txt"])
def test_empty_file(tmp_path, name, content):
    path = write(tmp_path, name, content)
    assert "file is empty" in str(data_error(path))


def test_empty_parquet_file(tmp_path):
    assert "file is empty" in str(data_error(write(tmp_path, "d.parquet", b"")))


def test_header_only(tmp_path):
    path = write(tmp_path, "d.tsv", "sentence\tlabel\n\n")
    assert "no data rows" in str(data_error(path))


def test_empty_json_array(tmp_path):
    assert "no data rows" in str(data_error(write(tmp_path, "d.json", "[]")))


def test_file_not_found(tmp_path):
    assert "not found" in str(data_error(tmp_path / "missing.csv"))


def test_directory(tmp_path):
    path = tmp_path / "dir.csv"
    path.mkdir()
    assert "directory" in str(data_error(path))


def test_invalid_jsonl_line(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"t": "a"}\n{"t": "b"}\n\n{"t": "c",}\n')
    err = data_error(path)
    assert err.line == 4
    assert f"{path.name}:4:" in str(err) and "invalid JSON" in str(err)


def test_jsonl_non_object_line(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"t": "a"}\n["b"]\n')
    err = data_error(path)
    assert err.line == 2 and "object" in str(err)


def test_invalid_json(tmp_path):
    path = write(tmp_path, "d.json", '[\n  {"t": "a"},\n  {"t": }\n]\n')
    err = data_error(path)
    assert err.line == 3 and "invalid JSON" in str(err)


@pytest.mark.parametrize(
    "content",
    ['"just a string"', '{"a": 1, "b": 2}', '{"x": [{"t": 1}], "y": [{"t": 2}]}'],
)
def test_json_wrong_shape(tmp_path, content):
    path = write(tmp_path, "d.json", content)
    err = data_error(path)
    assert "expected a JSON array of objects" in str(err)


def test_json_non_object_element(tmp_path):
    path = write(tmp_path, "d.json", '[\n  {"t": "a"},\n  "oops"\n]\n')
    err = data_error(path)
    assert err.line == 3 and "object" in str(err)


def test_bad_gzip(tmp_path):
    path = write(tmp_path, "d.csv.gz", b"not gzip at all")
    assert "gzip" in str(data_error(path))


# --------------------------------------------------------------------------- real data


def test_sst2_dev():
    path = SHARED_DATA / "sst2" / "dev.tsv"
    if not path.is_file():
        pytest.skip(f"SST-2 dev set not present at {path}")
    table = read_table(path, quoting=False)
    assert table.columns == ["sentence", "label"]
    assert len(table) == 6735
    assert table.lines[0] == 2 and table.lines[-1] == 6736
    assert set(column_values(table, "label", role="label column")) == {"0", "1"}
