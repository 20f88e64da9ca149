"""Word-tagged data for token classification: CoNLL column files, JSON/JSONL rows, and tagging schemes.

Formats:

* CoNLL column files (CoNLL-2000 chunking, CoNLL-2003 NER; Tjong Kim Sang & De Meulder 2003): one word a
  line, whitespace-separated columns (``word POS chunk NER`` in CoNLL-2003), the word first and the tag in
  ``tag_column`` (default -1 = the last); a blank line ends a sentence; ``-DOCSTART-`` lines are skipped.
  Every token line of a file has the same number of columns (a ragged line is a `DataError` naming it).
* JSON (a list) or JSONL (one object a line) rows ``{"tokens": [...], "tags": [...]}`` of equal lengths.

Schemes: IOB1 (Ramshaw & Marcus 1995: ``B-`` only between two adjacent entities of one type), IOB2 (every
entity starts with ``B-``; what CoNLL-2003 as distributed here and most corpora use) and BIOES (``S-`` single,
``E-`` end); ``none`` for tags without entity structure (POS: ``NN``, ``VBZ``), kept as they are.
Everything inside tuneforge is IOB2: `to_iob2` converts on reading and `from_iob2` back for
predictions. Both go through entity spans found with conlleval's chunk start/end rules (the CoNLL shared
task scorer, also what seqeval's default mode implements), so an ``I-X`` without a ``B-X`` starts an entity,
exactly as the scorer counts it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.data.readers import read_table
from tuneforge.errors import DataError

__all__ = ["PREFIXES", "TaggedSentences", "from_iob2", "read_tagged", "spans", "to_iob2", "write_spans"]

# The tag prefixes each scheme allows (besides the bare "O").
PREFIXES: dict[str, frozenset[str]] = {
    "iob1": frozenset("BI"),
    "iob2": frozenset("BI"),
    "bioes": frozenset("BIES"),
    "none": frozenset(),
}


@dataclass
class TaggedSentences:
    """One split: words per sentence, IOB2 tags per word (None for unlabelled input), and where each came from.

    ``lines[i]`` is the 1-based line of sentence i's first word (CoNLL/JSONL; the row number for JSON) and
    ``tag_lines[i][j]`` the line of its word j (CoNLL) or the sentence's line (JSON/JSONL).
    """

    tokens: list[list[str]]
    tags: list[list[str]] | None
    source: str
    lines: list[int]
    tag_lines: list[list[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)

    def subset(self, idx: list[int]) -> TaggedSentences:
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        return TaggedSentences(pick(self.tokens), pick(self.tags) if self.tags is not None else None, self.source,
                               pick(self.lines), pick(self.tag_lines) if self.tag_lines else [])

    @property
    def num_words(self) -> int:
        return sum(len(t) for t in self.tokens)


def _split(tag: str) -> tuple[str, str]:
    """(prefix, type) of a tag: ("O", "") for O."""
    if tag == "O":
        return "O", ""
    return tag[0], tag[2:]


def spans(tags: list[str]) -> list[tuple[str, int, int]]:
    """Entities (type, first word, last word inclusive) of a tag sequence in any of the three schemes.

    conlleval's ``startOfChunk``/``endOfChunk``: a chunk starts at B/S, at I/E after O, E or S, or at a type
    change; it ends before B/S/O, after E/S, or at a type change.
    """
    out: list[tuple[str, int, int]] = []
    start: int | None = None
    prev_p, prev_t = "O", ""
    for i, tag in enumerate([*tags, "O"]):
        p, t = _split(tag)
        end = start is not None and (prev_p in "ES" or p in "BSO" or t != prev_t)
        if end:
            out.append((prev_t, start, i - 1))
            start = None
        if p != "O" and (start is None or p in "BS" or prev_p in "ES" or t != prev_t):
            start = i
        prev_p, prev_t = p, t
    return out


def write_spans(entities: list[tuple[str, int, int]], n: int, scheme: str) -> list[str]:
    """Tags of ``n`` words holding ``entities`` (non-overlapping, sorted), written in ``scheme``."""
    tags = ["O"] * n
    prev_end, prev_type = -2, ""
    for typ, s, e in entities:
        for i in range(s, e + 1):
            tags[i] = f"I-{typ}"
        if scheme == "iob2" or (scheme == "iob1" and prev_end == s - 1 and prev_type == typ):
            tags[s] = f"B-{typ}"
        elif scheme == "bioes":
            if s == e:
                tags[s] = f"S-{typ}"
            else:
                tags[s], tags[e] = f"B-{typ}", f"E-{typ}"
        prev_end, prev_type = e, typ
    return tags


def to_iob2(tags: list[str], scheme: str) -> list[str]:
    """``tags`` in ``scheme`` as IOB2 (IOB2 input comes back as it is)."""
    return list(tags) if scheme in ("iob2", "none") else write_spans(spans(tags), len(tags), "iob2")


def from_iob2(tags: list[str], scheme: str) -> list[str]:
    """IOB2 ``tags`` written in ``scheme``."""
    return list(tags) if scheme in ("iob2", "none") else write_spans(spans(tags), len(tags), scheme)


def _check_tag(tag: str, scheme: str, path: Path, line: int) -> None:
    if tag == "O" or scheme == "none":
        return
    if len(tag) < 3 or tag[1] != "-" or tag[0] not in PREFIXES[scheme]:
        allowed = ", ".join(f"{p}-TYPE" for p in sorted(PREFIXES[scheme]))
        raise DataError(f"tag {tag!r} is not valid in scheme {scheme} (O, {allowed}; set task.scheme)", path, line)


def _read_conll(path: Path, tag_column: int | None, encoding: str) -> TaggedSentences:
    tokens: list[list[str]] = []
    tags: list[list[str]] = []
    lines: list[int] = []
    tag_lines: list[list[int]] = []
    words: list[str] = []
    wtags: list[str] = []
    wlines: list[int] = []
    width: int | None = None
    width_line = 0

    def flush() -> None:
        if words:
            tokens.append(list(words))
            tags.append(list(wtags))
            lines.append(wlines[0])
            tag_lines.append(list(wlines))
            words.clear()
            wtags.clear()
            wlines.clear()

    with open(path, encoding=encoding) as f:
        for no, raw in enumerate(f, start=1):
            cols = raw.split()
            if not cols:
                flush()
                continue
            if cols[0] == "-DOCSTART-":
                flush()
                continue
            if width is None:
                width, width_line = len(cols), no
                if tag_column is not None and not -width <= tag_column < width:
                    raise DataError(f"task.tag_column={tag_column} but lines have {width} columns", path, no)
                if tag_column is not None and width < 2:
                    raise DataError("a tagged line needs at least 2 columns (word ... tag)", path, no)
            elif len(cols) != width:
                raise DataError(f"{len(cols)} columns, but line {width_line} has {width} (ragged CoNLL file)", path, no)
            words.append(cols[0])
            wtags.append(cols[tag_column] if tag_column is not None else "")
            wlines.append(no)
    flush()
    return TaggedSentences(tokens, tags if tag_column is not None else None, str(path), lines, tag_lines)


def _read_json(path: Path, jsonl: bool, need_tags: bool, tokens_field: str, tags_field: str,
               encoding: str) -> TaggedSentences:
    tokens, tags, lines = [], [], []
    table = read_table(path, "jsonl" if jsonl else "json", encoding=encoding)  # rows with their line numbers
    for no, row in zip(table.lines, table.rows, strict=True):
        if not isinstance(row.get(tokens_field), list):
            raise DataError(f"expected an object with a '{tokens_field}' list", path, no)
        words = [str(w) for w in row[tokens_field]]
        if not words:
            continue
        if need_tags:
            t = row.get(tags_field)
            if not isinstance(t, list):
                raise DataError(f"expected a '{tags_field}' list", path, no)
            if len(t) != len(words):
                raise DataError(f"{len(words)} tokens but {len(t)} tags", path, no)
            tags.append([str(x) for x in t])
        tokens.append(words)
        lines.append(no)
    return TaggedSentences(tokens, tags if need_tags else None, str(path), lines, [[n] * len(w) for n, w in
                                                                                   zip(lines, tokens, strict=True)])


def read_tagged(path: Path, *, scheme: str = "iob2", tag_column: int = -1, need_tags: bool = True,
                fmt: str | None = None, tokens_field: str = "tokens", tags_field: str = "tags",
                encoding: str = "utf-8") -> TaggedSentences:
    """Read a CoNLL column file or JSON/JSONL rows (by ``fmt`` or the extension); tags are checked against
    ``scheme`` and returned as IOB2. With ``need_tags=False`` (prediction input) only the words are read."""
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", path)
    kind = (fmt or path.suffix.lstrip(".")).lower()
    if kind in ("json", "jsonl"):
        out = _read_json(path, kind == "jsonl", need_tags, tokens_field, tags_field, encoding)
    else:
        out = _read_conll(path, tag_column if need_tags else None, encoding)
    if not out.tokens:
        raise DataError("no sentences", path)
    if out.tags is not None:
        for i, seq in enumerate(out.tags):
            for tag, line in zip(seq, out.tag_lines[i], strict=True):
                _check_tag(tag, scheme, path, line)
            out.tags[i] = to_iob2(seq, scheme)
    return out
