"""Checks of a safetensors header against its file, before any tensor is read.

A header is JSON that a damaged or hostile file can make lie: offsets past the end, sizes that do
not match dtype and shape, a length prefix of 2^62. ``read_safetensors_header`` reads only the
header and raises ForgeError for every such lie, so no reader allocates memory on its word.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from llmforge.errors import ForgeError

# A safetensors header takes about a hundred bytes per tensor. The safetensors library rejects
# headers over 100 MB too, so a larger one is a damaged or hostile file.
MAX_HEADER_BYTES = 100_000_000

_DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}


def read_safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a safetensors header against the file size; raise ForgeError when it lies.

    Checks: the 8-byte length prefix, the header size limit, valid JSON, known dtypes, offsets
    that lie inside the data section, sizes that match dtype and shape, and no trailing bytes.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ForgeError(f"{path}: not a safetensors file (only {size} bytes); the file is truncated or empty")
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > MAX_HEADER_BYTES or 8 + header_length > size:
            raise ForgeError(
                f"{path}: corrupt safetensors header (declares {header_length} header bytes in a "
                f"{size}-byte file); the file is truncated or damaged, so recreate it"
            )
        raw = handle.read(header_length)

    try:
        header = json.loads(raw)
    except ValueError as error:  # also invalid UTF-8 and integers of more than 4300 digits
        raise ForgeError(f"{path}: corrupt safetensors header ({error}); recreate the file") from None
    except RecursionError:
        raise ForgeError(f"{path}: corrupt safetensors header (JSON nested too deeply); recreate the file") from None
    if not isinstance(header, dict):
        raise ForgeError(f"{path}: corrupt safetensors header (not a JSON object); recreate the file")

    data_size = size - 8 - header_length
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(value, str) for value in entry.values()):
                raise ForgeError(f"{path}: corrupt safetensors header (__metadata__ is not a mapping of strings); "
                                 "recreate the file")
            continue
        _check_header_entry(path, name, entry, data_size)
        end = max(end, entry["data_offsets"][1])
    if end != data_size:
        raise ForgeError(
            f"{path}: the data section has {data_size} bytes but the header describes {end}; "
            "the file is truncated or damaged, so recreate it"
        )
    return header


def _is_size(value: Any) -> bool:
    """Return True for an int that can be a tensor dimension or a byte offset (torch sizes are int64)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _check_header_entry(path: Path, name: str, entry: Any, data_size: int) -> None:
    valid = (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
             and isinstance(entry.get("shape"), list) and all(_is_size(dim) for dim in entry["shape"])
             and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
             and all(_is_size(offset) for offset in entry["data_offsets"]))
    if not valid:
        raise ForgeError(f"{path}: corrupt safetensors header entry for tensor {name!r}; recreate the file")
    dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
    element_count = 1
    for dim in shape:
        element_count *= dim
    if dtype not in _DTYPE_SIZES:
        raise ForgeError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
    if not (0 <= begin <= end <= data_size) or end - begin != element_count * _DTYPE_SIZES[dtype]:
        raise ForgeError(
            f"{path}: tensor {name!r} has offsets {begin}..{end} that do not fit its shape {shape} "
            f"and the {data_size}-byte data section; the file is truncated or damaged"
        )
