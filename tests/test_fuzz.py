"""Property-based tests (hypothesis) of the parsers that read user files.

They cover data files, eval task specs and safetensors headers. Each property feeds generated,
damaged or random input to a parser. The parser must either return a well-formed result or raise
ForgeError that names the file, and it must never raise another exception.
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from llmforge.checkpoint import TASK_VECTOR_FORMAT, TASK_VECTOR_FORMAT_VERSION, load_task_vector, load_tensors, read_metadata
from llmforge.data import EXAMPLE_FORMATS, FORMAT_FIELDS, Example, Records, read_records, to_examples
from llmforge.errors import ForgeError
from llmforge.safetensors_header import MAX_HEADER_BYTES, read_safetensors_header
from llmforge_eval.tasks import (
    CHOICE_METRICS,
    EXTRACTORS,
    GENERATE_METRICS,
    TaskSpec,
    load_spec_file,
    parse_spec,
    task_digest,
)

# No example database: runs stay independent and leave no .hypothesis/ folder in the checkout.
FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FEW = settings(FUZZ, max_examples=60)
# The byte-level parsers take well under a millisecond per example, so they get more.
MANY = settings(FUZZ, max_examples=400)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """One directory per module: hypothesis runs many examples per test and each overwrites its files."""
    return tmp_path_factory.mktemp("fuzz")


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)), max_leaves=12)

# Pieces of text that make the parsers meet their hard cases: quotes, separators, line ends that
# str.splitlines treats as breaks, a byte-order mark, NUL, integers too long for int(), and
# nesting deeper than Python's recursion limit.
FRAGMENTS = ['{', '}', '[', ']', '"', "'", ',', ':', '\t', '\n', '\r\n', '\r', ' ', 'a', 'text', 'prompt',
             '"a"', '"text": ', '1', '-0.5e3', 'null', 'true', 'NaN', '\ufeff', '\x00', '\u2028', '\x85', 'é',
             '\\', '\\u12', '\\ud800', '1' * 5000, '[' * 1200, '{"a":' * 1200]
fragment_text = st.lists(st.sampled_from(FRAGMENTS), max_size=24).map("".join)
file_bytes = st.one_of(
    st.binary(max_size=200),
    fragment_text.map(lambda text: text.encode("utf-8")),
    st.builds(lambda text, junk: text.encode("utf-8") + junk, fragment_text, st.binary(min_size=1, max_size=4)),
)


def line_count(raw: bytes) -> int:
    """Return an upper bound of the lines in `raw`: the csv module also ends a line at a lone carriage return."""
    return raw.count(b"\n") + raw.count(b"\r") + 1


def check_forge_error(error: ForgeError, path: Path, raw: bytes) -> None:
    """Check that a reader's error names the file first, and any FILE:LINE a line that exists."""
    message = str(error)
    assert message.startswith(str(path)), message
    located = re.match(rf"{re.escape(str(path))}:(\d+):", message)
    if located:
        assert 1 <= int(located.group(1)) <= line_count(raw), message


# Data files


@MANY
@given(raw=file_bytes, fmt=st.sampled_from(["jsonl", "json", "csv", "tsv", "txt"]))
def test_reader_arbitrary_bytes(scratch, raw, fmt):
    path = scratch / f"data.{fmt}"
    path.write_bytes(raw)

    try:
        records = read_records(path)
    except ForgeError as error:
        check_forge_error(error, path, raw)
        return

    assert isinstance(records, Records)
    assert records
    assert all(isinstance(record, dict) for record in records)
    if fmt != "json":
        assert len(records.lines) == len(records)
        assert records.lines == sorted(set(records.lines))
        assert records.lines[0] >= 1
        assert records.lines[-1] <= line_count(raw)
    if fmt == "txt":
        assert all(record["text"].strip() for record in records)


ENCODINGS = ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-32", "latin-1", "cp1252", "shift_jis"]


@FUZZ
@given(text=st.text(max_size=40), encoding=st.sampled_from(ENCODINGS))
def test_reader_text_encodings(scratch, text, encoding):
    path = scratch / "encoded.txt"
    raw = text.encode(encoding, errors="replace")
    path.write_bytes(raw)

    try:
        decoded = raw.decode("utf-8-sig")
    except UnicodeDecodeError as expected:
        line = raw[:expected.start].count(b"\n") + 1
        with pytest.raises(ForgeError, match="invalid UTF-8 byte") as raised:
            read_records(path)
        check_forge_error(raised.value, path, raw)
        assert str(raised.value).startswith(f"{path}:{line}: ")
        return

    if not decoded.strip():
        with pytest.raises(ForgeError, match="no records found"):
            read_records(path)
        return
    # Paragraphs keep every non-blank line, so the words survive in order.
    records = read_records(path)
    assert " ".join(record["text"] for record in records).split() == decoded.split()


csv_names = st.lists(st.from_regex(r"[a-z]{1,6}", fullmatch=True), min_size=1, max_size=4, unique=True)
csv_rows = st.lists(st.lists(st.from_regex(r"[a-z0-9 ]{0,4}[a-z0-9]", fullmatch=True), min_size=1, max_size=6),
                    max_size=6)


@FUZZ
@given(header=csv_names, rows=csv_rows, delimiter=st.sampled_from([",", "\t"]))
def test_csv_rows_with_missing_or_extra_columns(scratch, header, rows, delimiter):
    path = scratch / ("table.csv" if delimiter == "," else "table.tsv")
    path.write_text("\n".join(delimiter.join(row) for row in [header, *rows]) + "\n", encoding="utf-8")
    bad = [index for index, row in enumerate(rows) if len(row) != len(header)]

    if not rows:
        with pytest.raises(ForgeError, match=rf"^{re.escape(str(path))}: no records found"):
            read_records(path)
    elif bad:
        # The header is line 1, so row i is on line i + 2.
        first = bad[0]
        with pytest.raises(ForgeError, match=rf"^{re.escape(str(path))}:{first + 2}: ") as raised:
            read_records(path)
        if len(rows[first]) < len(header):
            assert f"missing column(s) {', '.join(header[len(rows[first]):])}" in str(raised.value)
    else:
        records = read_records(path)
        assert records == [dict(zip(header, row)) for row in rows]
        assert records.lines == list(range(2, len(rows) + 2))


record_fields = st.one_of(st.sampled_from(FORMAT_FIELDS), st.text(max_size=6))
field_values = st.one_of(json_values, st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "robot"]), "content": json_scalars}), max_size=3))
template_text = st.lists(st.sampled_from(
    ["{", "}", "{{", "}}", "text", "question", "answer", "prompt", ".", "x", "[0]", "[x]", "!r", "!z", ":>4", ":d",
     " ", "__class__"]), max_size=8).map("".join)


@FUZZ
@given(records=st.lists(st.dictionaries(record_fields, field_values, max_size=4), min_size=1, max_size=3),
       fmt=st.sampled_from(EXAMPLE_FORMATS),
       columns=st.dictionaries(record_fields, record_fields, max_size=2),
       prompt_template=st.none() | template_text, completion_template=st.none() | template_text)
def test_to_examples_random_records(records, fmt, columns, prompt_template, completion_template):
    source = Records(records, source="data.jsonl", lines=range(1, len(records) + 1))
    try:
        examples = to_examples(source, None, fmt=fmt, columns=columns, prompt_template=prompt_template,
                               completion_template=completion_template)
    except ForgeError:
        return

    assert len(examples) == len(records)
    for example in examples:
        assert isinstance(example, Example)
        assert isinstance(example.prompt, str)
        assert isinstance(example.completion, str) and example.completion


# Task specs

names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,10}", fullmatch=True)
nonempty = st.text(min_size=1, max_size=12)
strings = st.lists(st.text(max_size=6), max_size=3)
extractors = st.sampled_from([*EXTRACTORS, r"regex:(\d+)", "regex:[a-z]+", "regex:"])


@st.composite
def valid_specs(draw) -> dict:
    """A raw spec dict that parse_spec must accept, for any of the three kinds."""
    spec = {"name": draw(names), "data": draw(nonempty)}
    if draw(st.booleans()):
        spec["description"] = draw(st.text(max_size=12))
    kind = draw(st.sampled_from(["multiple_choice", "generate", "perplexity"]))
    spec["kind"] = kind
    optional: dict[str, st.SearchStrategy] = {}
    if kind == "multiple_choice":
        spec.update(prompt=draw(nonempty), choices=draw(st.one_of(nonempty, strings)), answer=draw(nonempty))
        optional = {"metric": st.sampled_from(CHOICE_METRICS), "continuation": st.text(max_size=8),
                    "choice_text": nonempty, "choice_label": nonempty,
                    "answer_map": st.dictionaries(st.text(max_size=3), st.integers(0, 9), max_size=3)}
    elif kind == "generate":
        spec.update(prompt=draw(nonempty), reference=draw(nonempty))
        metric = draw(st.sampled_from([None, *GENERATE_METRICS]))
        if metric is not None:
            spec["metric"] = metric
        if metric in (None, "exact_match") and draw(st.booleans()):
            spec["normalize"] = "squad"
        optional = {"extract": extractors, "reference_extract": extractors, "stop": strings,
                    "max_new_tokens": st.integers(1, 512)}
    else:
        max_length = draw(st.integers(1, 4096))
        spec.update(max_length=max_length, stride=draw(st.integers(1, max_length)))
        optional = {"text_field": nonempty, "metric": st.just("perplexity")}
    for field, strategy in optional.items():
        if draw(st.booleans()):
            spec[field] = draw(strategy)
    return spec


def spec_fields(spec: TaskSpec) -> dict:
    fields = dataclasses.asdict(spec)
    fields.pop("source")
    return fields


@FUZZ
@given(raw=valid_specs(), suffix=st.sampled_from([".yaml", ".json"]))
def test_valid_spec_round_trips(scratch, raw, suffix):
    spec = parse_spec(raw, source="fuzz")
    assert parse_spec(spec_fields(spec)) == spec

    path = scratch / f"task{suffix}"
    text = yaml.safe_dump(raw, allow_unicode=True) if suffix == ".yaml" else json.dumps(raw)
    # PyYAML 6 writes some characters, such as U+0085 (NEL), so that it reads them back as others.
    assume(suffix == ".json" or yaml.safe_load(text) == raw)
    path.write_text(text, encoding="utf-8")
    assert load_spec_file(path) == spec

    data = scratch / "task-data.jsonl"
    data.write_text('{"a": 1}\n', encoding="utf-8")
    assert task_digest(spec, data) == task_digest(parse_spec(spec_fields(spec)), data)


spec_keys = st.one_of(st.sampled_from(sorted(spec_fields(parse_spec(
    {"name": "t", "kind": "perplexity", "data": "d"})))), st.text(max_size=6), st.integers(), st.booleans())


@st.composite
def broken_specs(draw) -> dict:
    """A valid spec with fields replaced, added or removed, or a dict of random keys and values."""
    if draw(st.booleans()):
        return draw(st.dictionaries(spec_keys, json_values, max_size=8))
    spec = draw(valid_specs())
    for _ in range(draw(st.integers(1, 3))):
        key = draw(spec_keys)
        if key in spec and draw(st.booleans()):
            del spec[key]
        else:
            spec[key] = draw(st.one_of(json_values, extractors, st.integers(-3, 3)))
    return spec


@FUZZ
@given(raw=broken_specs())
def test_broken_spec_forge_error_or_valid(raw):
    try:
        spec = parse_spec(raw, source="fuzz.yaml")
    except ForgeError as error:
        assert "fuzz.yaml" in str(error)
        return

    assert isinstance(spec, TaskSpec)
    assert parse_spec(spec_fields(spec)) == spec


@FEW
@given(raw=st.one_of(file_bytes, fragment_text.map(lambda text: ("name: t\nkind: " + text).encode("utf-8"))))
def test_spec_file_arbitrary_bytes(scratch, raw):
    path = scratch / "random-task.yaml"
    path.write_bytes(raw)
    try:
        load_spec_file(path)
    except ForgeError as error:
        assert str(path) in str(error)


# Safetensors headers

LOADABLE_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "I32": 4, "I64": 8, "F16": 2, "BF16": 2, "F32": 4, "F64": 8}
OTHER_DTYPES = ["U16", "U32", "U64", "F8_E4M3", "F8_E5M2", "F128", "", "f32", 7, None, ["F32"]]


def safetensors_bytes(header: dict, data: bytes, *, header_length: int | None = None) -> bytes:
    """Serialise a header dict and a data section as a safetensors file, with an optional lying length prefix."""
    text = json.dumps(header).encode("utf-8")
    return struct.pack("<Q", len(text) if header_length is None else header_length) + text + data


@st.composite
def valid_files(draw) -> tuple[dict, bytes]:
    """A well-formed safetensors header (tensors packed in order) and a data section of random bytes."""
    header, offset = {}, 0
    for name in draw(st.lists(st.from_regex(r"[a-z][a-z0-9._]{0,8}", fullmatch=True), max_size=4, unique=True)):
        dtype = draw(st.sampled_from(sorted(LOADABLE_DTYPES)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        size = LOADABLE_DTYPES[dtype]
        for dim in shape:
            size *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3))
    return header, draw(st.binary(min_size=offset, max_size=offset))


def check_loaded(path: Path, raw: bytes) -> None:
    """Load `path` and check every tensor against the bytes its header entry names, or accept a ForgeError."""
    import torch

    try:
        header = read_safetensors_header(path)
        tensors = load_tensors(path)
        read_metadata(path)
    except ForgeError as error:
        assert str(path) in str(error)
        return

    (length,) = struct.unpack("<Q", raw[:8])
    assert header == json.loads(raw[8:8 + length])
    data = raw[8 + length:]
    assert sorted(tensors) == sorted(name for name in header if name != "__metadata__")
    for name, tensor in tensors.items():
        begin, end = header[name]["data_offsets"]
        assert list(tensor.shape) == header[name]["shape"]
        assert tensor.element_size() == LOADABLE_DTYPES[header[name]["dtype"]]
        assert tensor.reshape(-1).view(torch.uint8).numpy().tobytes() == data[begin:end]


@FUZZ
@given(file=valid_files())
def test_valid_safetensors_load_exactly(scratch, file):
    header, data = file
    path = scratch / "valid.safetensors"
    raw = safetensors_bytes(header, data)
    path.write_bytes(raw)

    assert read_safetensors_header(path) == header
    check_loaded(path, raw)
    assert len(load_tensors(path)) == len([name for name in header if name != "__metadata__"])


@FUZZ
@given(file=valid_files(), cut=st.integers(min_value=0))
def test_truncated_safetensors_rejected(scratch, file, cut):
    header, data = file
    raw = safetensors_bytes(header, data)
    path = scratch / "truncated.safetensors"
    path.write_bytes(raw[:cut % len(raw)])

    with pytest.raises(ForgeError, match=re.escape(str(path))):
        load_tensors(path)


entry_values = st.one_of(
    st.sampled_from([*LOADABLE_DTYPES, *OTHER_DTYPES]),
    st.lists(st.one_of(st.integers(-3, 8), st.integers(2**62, 2**66), st.floats(0, 8), st.booleans(),
                       st.text(max_size=2)), max_size=3),
    json_values,
)


@st.composite
def lying_files(draw) -> bytes:
    """A valid file with header entries replaced by random values, or a lying length prefix."""
    header, data = draw(valid_files())
    names = [name for name in header if name != "__metadata__"]
    for _ in range(draw(st.integers(1, 3))):
        choice = draw(st.integers(0, 3))
        if choice == 0 and names:
            entry = header[draw(st.sampled_from(names))]
            entry[draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))] = draw(entry_values)
        elif choice == 1 and names:
            entry = header[draw(st.sampled_from(names))]
            entry["data_offsets"] = [draw(st.integers(-4, len(data) + 4)), draw(st.integers(-4, len(data) + 4))]
        elif choice == 2:
            header[draw(st.one_of(st.text(max_size=4), st.just("__metadata__")))] = draw(entry_values)
        else:
            data = data + draw(st.binary(min_size=1, max_size=8)) if draw(st.booleans()) else data[:-1]
    length = draw(st.none() | st.integers(0, 2**64 - 1) | st.sampled_from([MAX_HEADER_BYTES + 1, 2**62]))
    return safetensors_bytes(header, data, header_length=length)


@MANY
@given(raw=st.one_of(lying_files(), st.binary(max_size=64),
                     st.builds(lambda text, data: struct.pack("<Q", len(text.encode())) + text.encode() + data,
                               fragment_text, st.binary(max_size=16))))
def test_damaged_safetensors_forge_error_or_exact(scratch, raw):
    path = scratch / "damaged.safetensors"
    path.write_bytes(raw)
    check_loaded(path, raw)


@FEW
@given(file=valid_files(), metadata=st.dictionaries(st.sampled_from(["format", "format_version", "x"]),
                                                    st.one_of(st.text(max_size=4), json_values,
                                                              st.sampled_from([TASK_VECTOR_FORMAT, TASK_VECTOR_FORMAT_VERSION])),
                                                    max_size=3))
def test_task_vector_random_metadata(scratch, file, metadata):
    import torch

    header, data = file
    header["__metadata__"] = metadata
    path = scratch / "vector.safetensors"
    path.write_bytes(safetensors_bytes(header, data))

    try:
        tensors, read = load_task_vector(path)
    except ForgeError as error:
        assert str(path) in str(error)
        return
    assert read == metadata
    assert read["format"] == TASK_VECTOR_FORMAT
    assert read["format_version"] == TASK_VECTOR_FORMAT_VERSION
    assert all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())
