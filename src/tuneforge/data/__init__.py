"""Data: readers with line-numbered validation, tokenization cache, batching and collation."""

from tuneforge.data.readers import FORMATS, Table, column_values, detect_format, read_table, resolve_column

__all__ = ["FORMATS", "Table", "column_values", "detect_format", "read_table", "resolve_column"]
