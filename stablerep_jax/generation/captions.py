"""Captions files for `generate`: reading them strictly and tokenizing them for the text encoder.

A captions file is `.txt` (one caption per line: lines end at "\n" only, with a "\r" before it
dropped, so U+2028, U+0085 or a form feed inside a caption never cut it in two) or `.csv` / `.tsv`
with a header row and a caption column, one record per line: `.tsv` is read without quoting
(a '"' is a character of the caption), and a `.csv` field holding a line break is an error
naming its row. Blank captions are skipped and counted; caption ids
number the kept captions 0, 1, 2, ... in file order (the `caption_id` of the TFRecord schema).
The rows of the skipped blanks are kept (`Captions.blank_rows`), so `Captions.row_of` maps a
caption id back to its line of the file (the reference keeps blank lines as empty prompts and
numbers images by line). Every problem (missing or empty file, text that is not UTF-8, no
caption column) is reported with the file name before any model or device work starts.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import os
from collections.abc import Sequence

import numpy as np

from stablerep_jax import fileio
from stablerep_jax.data import tokenize

TEXT_SUFFIXES = (".txt",)
TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t"}


@dataclasses.dataclass(frozen=True)
class Captions:
    """The kept captions of a file (index = caption_id), how many blank ones were skipped and
    their rows (1-based: the line of a .txt file; for .csv/.tsv the record, the header being 1)."""
    path: str
    texts: tuple[str, ...]
    blank_skipped: int
    blank_rows: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.texts)

    def row_of(self, caption_id: int) -> int:
        """The 1-based row of the file that caption `caption_id` came from."""
        if not 0 <= caption_id < len(self.texts):
            raise IndexError(f"caption_id {caption_id} out of range [0, {len(self.texts)})")
        first = 2 if os.path.splitext(self.path)[1].lower() in TABLE_SUFFIXES else 1
        row = first + caption_id
        for blank in self.blank_rows:      # sorted: each blank at or before the row shifts it
            if blank > row:
                break
            row += 1
        return row

    def fingerprint(self) -> str:
        """sha256 of the kept captions: a rerun into the same output must see the same list."""
        digest = hashlib.sha256()
        for text in self.texts:
            digest.update(text.encode("utf-8") + b"\n")
        return digest.hexdigest()


def _read_text(path: str) -> str:
    """The file's text (local path or any tf.io.gfile URL such as gs://)."""
    try:
        data = fileio.read_bytes(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"captions file {path!r} does not exist") from e
    except IsADirectoryError as e:
        raise IsADirectoryError(f"captions file {path!r} is a directory, not a file") from e
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"captions file {path!r} is not UTF-8 text: undecodable bytes "
                         f"{data[e.start:e.end]!r} on line {line}") from e


def _table_rows(path: str, text: str, delimiter: str):
    """(row number, fields) of a .csv / .tsv file, the header being row 1.

    .tsv is read with no quoting at all (csv.QUOTE_NONE), as CC12M-style files are written: a
    caption that starts with a '"' keeps it and never swallows the lines after it. In .csv a
    quoted field may not hold a line break either: each record must be one line, so an unclosed
    quote is caught at its row instead of silently merging captions."""
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    row_number, last_line = 0, 0
    while True:
        row_number += 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise ValueError(f"captions file {path!r}, row {row_number} (line "
                             f"{last_line + 1}): {e}") from e
        first_line, last_line = last_line + 1, reader.line_num
        if any("\n" in field or "\r" in field for field in row):
            raise ValueError(
                f"captions file {path!r}, row {row_number} (lines {first_line}-{last_line}): a "
                "quoted field holds a line break; every record must be on one line (an unclosed "
                "'\"' joins the lines after it into one caption): fix the quoting, or write the "
                "captions as .tsv (read without quoting) or .txt (one caption per line)")
        yield row_number, row


def _table_captions(path: str, text: str, delimiter: str, column: str) -> list[str]:
    rows = _table_rows(path, text, delimiter)
    first = next(rows, None)
    if first is None:
        return []
    names = [h.strip() for h in first[1]]
    if column not in names:
        raise ValueError(f"captions file {path!r} has no column {column!r} (header: "
                         f"{', '.join(repr(n) for n in names)}); set --config.caption_column")
    index = names.index(column)
    out = []
    for row_number, row in rows:
        if not row:           # an empty line: a blank caption
            out.append("")
            continue
        if index >= len(row):
            raise ValueError(f"captions file {path!r}, row {row_number}: {len(row)} fields, "
                             f"no value for column {column!r}")
        out.append(row[index])
    return out


def split_lines(text: str) -> list[str]:
    """The lines of a .txt captions file: split at "\n" only (str.splitlines would also split at
    U+2028, U+0085, form feeds, ...), a trailing "\r" dropped, no empty line after a final "\n"."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def read_captions(path: str, caption_column: str = "caption") -> Captions:
    """Reads and checks a captions file; raises with the file name on any problem."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in TEXT_SUFFIXES and suffix not in TABLE_SUFFIXES:
        raise ValueError(f"captions file {path!r}: unknown extension {suffix!r}; use .txt (one "
                         f"caption per line), .csv or .tsv (with a {caption_column!r} column)")
    text = _read_text(path)
    if suffix in TABLE_SUFFIXES:
        raw = _table_captions(path, text, TABLE_SUFFIXES[suffix], caption_column)
    else:
        raw = split_lines(text)
    first = 2 if suffix in TABLE_SUFFIXES else 1
    kept = tuple(c.strip() for c in raw if c.strip())
    blank_rows = tuple(first + i for i, c in enumerate(raw) if not c.strip())
    if not kept:
        raise ValueError(f"captions file {path!r} holds no captions "
                         f"({len(raw)} lines, all blank)" if raw else
                         f"captions file {path!r} is empty")
    return Captions(path=path, texts=kept, blank_skipped=len(blank_rows), blank_rows=blank_rows)


def sd_prompt_ids(tokenizer, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Prompt ids int32 [N, model_max_length] as the SD pipeline feeds its text encoder (start
    token, BPE tokens, end token, padded with the tokenizer's pad token), and a bool [N] mask of
    the captions that were longer than `tokenizer.model_max_length` and lost their tail."""
    return tokenize.token_ids(tokenizer, texts, int(tokenizer.model_max_length),
                              tokenizer.pad_token_id)
