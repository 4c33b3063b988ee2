"""File readers for data sets: JSONL, JSON arrays, CSV, TSV and plain text into lists of records.

Every reader reports a malformed line as FILE:LINE with the reason, and an empty data set as
an error, so that a user finds the bad record without a traceback.
"""

from __future__ import annotations

import csv
import io
import json
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

from llmforge.errors import ForgeError

READ_FORMATS = ("jsonl", "json", "csv", "tsv", "txt")


class Records(list):
    """A list of record dicts that remembers its file and the line where each record starts."""

    def __init__(self, items: Iterable[dict] = (), *, source: str = "", lines: Sequence[int] = ()):
        super().__init__(items)
        self.source = source
        self.lines = list(lines)

    def head(self, count: int | None) -> "Records":
        """Return the first `count` records (all when None), keeping FILE:LINE for each; a plain slice is a list."""
        if count is None:
            return self
        return Records(self[:count], source=self.source, lines=self.lines[:count])

    def where(self, index: int) -> str:
        """Return "FILE:LINE" for record `index`, or "record N" where the line is unknown."""
        if self.source and index < len(self.lines):
            return f"{self.source}:{self.lines[index]}"
        if self.source:
            return f"{self.source}: record {index + 1}"
        return f"record {index + 1}"


def where(records: Sequence[dict], index: int) -> str:
    """Return "FILE:LINE" for record `index` of a Records list, else "record N"."""
    if isinstance(records, Records):
        return records.where(index)
    return f"record {index + 1}"


def resolve_data_path(spec: str) -> Path:
    """Turn a data argument into a file path: a plain path, or "demo:NAME" for a shipped demo file.

    Raises ForgeError when the file does not exist or the demo name is unknown (the message
    lists the available demo files).
    """
    if spec.startswith("demo:"):
        name = spec[len("demo:"):]
        root = Path(str(resources.files("llmforge") / "demo"))
        available = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jsonl"))
        if name not in available:
            raise ForgeError(f"unknown demo data set {spec!r}; available: "
                             + ", ".join(f"demo:{n}" for n in available))
        return root / name

    path = Path(spec).expanduser()
    if not path.is_file():
        raise ForgeError(f"data file not found: {spec}; pass an existing file or demo:NAME")
    return path


def read_records(path: str | Path, *, fmt: str | None = None) -> Records:
    """Read a data file into a list of record dicts.

    fmt is one of jsonl, json (an array of objects), csv, tsv (a header row names the fields)
    or txt (one record {"text": ...} per paragraph, paragraphs separated by blank lines); by
    default it comes from the file suffix. The file must be UTF-8 (a byte-order mark is
    allowed). Raises ForgeError "FILE:LINE: reason" on a malformed line and ForgeError when
    the file contains no records.
    """
    path = Path(path)
    fmt = fmt or _format_from_suffix(path)
    if fmt not in READ_FORMATS:
        raise ForgeError(f"unknown data format {fmt!r} for {path}; use one of: {', '.join(READ_FORMATS)}")

    text = _read_text(path)
    readers = {"jsonl": _parse_jsonl, "json": _parse_json, "csv": _parse_csv, "tsv": _parse_tsv,
               "txt": _parse_txt}
    records = readers[fmt](text, str(path))

    if not records:
        raise ForgeError(f"{path}: no records found; the data set is empty")
    return records


def _format_from_suffix(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    if suffix in READ_FORMATS:
        return suffix
    if suffix == "text":
        return "txt"
    raise ForgeError(f"cannot tell the format of {path} from its suffix; "
                     f"rename it or pass a format ({', '.join(READ_FORMATS)})")


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ForgeError(f"cannot read data file {path}: {error.strerror}") from error

    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        raise ForgeError(f"{path}:{line}: invalid UTF-8 byte 0x{raw[error.start]:02x} at offset "
                         f"{error.start}; convert the file to UTF-8") from error
    return text


def _parse_jsonl(text: str, source: str) -> Records:
    records = Records(source=source)
    # Split on "\n" only: str.splitlines also splits on U+0085 and U+2028, which JSON strings may hold.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue

        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise ForgeError(f"{source}:{number}: invalid JSON: {error.msg} (column {error.colno})") from error
        except (ValueError, RecursionError) as error:
            raise ForgeError(f"{source}:{number}: cannot parse the JSON: {_json_limit(error)}") from None
        if not isinstance(value, dict):
            raise ForgeError(f"{source}:{number}: expected a JSON object, got {type(value).__name__}")

        records.append(value)
        records.lines.append(number)
    return records


def _parse_json(text: str, source: str) -> Records:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ForgeError(f"{source}:{error.lineno}: invalid JSON: {error.msg} (column {error.colno})") from error
    except (ValueError, RecursionError) as error:
        raise ForgeError(f"{source}: cannot parse the JSON: {_json_limit(error)}") from None
    if not isinstance(value, list):
        raise ForgeError(f"{source}:1: expected a JSON array of objects, got {type(value).__name__}")

    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise ForgeError(f"{source}: item {index + 1} of the array is {type(item).__name__}, "
                             "expected a JSON object")
    # json.loads keeps no line number per array item, so messages name "FILE: record N" instead.
    return Records(value, source=source)


def _json_limit(error: ValueError | RecursionError) -> str:
    """Describe which limit of Python's json module the JSON exceeds, and what to change."""
    if isinstance(error, RecursionError):
        return "arrays or objects are nested too deeply for Python's parser; flatten them"
    # Python 3.11+ rejects int() of more than 4300 digits (sys.get_int_max_str_digits).
    return f"{str(error).split(';')[0]}; store such numbers as strings"


def _parse_csv(text: str, source: str, delimiter: str = ",") -> Records:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        return Records(source=source)
    except csv.Error as error:
        raise ForgeError(f"{source}:1: invalid header: {error}") from error
    if not header:
        raise ForgeError(f"{source}:1: the header row is empty; the first line must name the columns")
    if len(set(header)) != len(header) or any(not name for name in header):
        raise ForgeError(f"{source}:1: the header row needs unique, non-empty column names, got {header}")

    records = Records(source=source)
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as error:
            raise ForgeError(f"{source}:{reader.line_num}: {error}") from error

        if not row:
            continue
        if len(row) < len(header):
            missing = ", ".join(header[len(row):])
            raise ForgeError(f"{source}:{start}: missing column(s) {missing}: the row has {len(row)} "
                             f"field(s), the header has {len(header)}")
        if len(row) > len(header):
            raise ForgeError(f"{source}:{start}: the row has {len(row)} fields, the header only {len(header)}")

        records.append(dict(zip(header, row)))
        records.lines.append(start)
    return records


def _parse_tsv(text: str, source: str) -> Records:
    return _parse_csv(text, source, delimiter="\t")


def _parse_txt(text: str, source: str) -> Records:
    records = Records(source=source)
    paragraph: list[str] = []
    start = 0
    for number, line in enumerate(text.split("\n") + [""], start=1):
        line = line.rstrip("\r")
        if line.strip():
            if not paragraph:
                start = number
            paragraph.append(line)
        elif paragraph:
            records.append({"text": "\n".join(paragraph)})
            records.lines.append(start)
            paragraph = []
    return records
