"""Read and write safetensors files one tensor, or one block of rows, at a time, without memory maps.

A memory-mapped page that has been read counts towards the process's resident memory (as
RssFile) while the map is open and the page is cached. One pass over a model and two task
vectors through `safetensors.safe_open` can therefore keep all three files resident. Positioned
reads (`os.preadv`) leave the file data in the page cache only, so the process's resident
memory is just the arrays it is using.

Arrays come back as numpy arrays of the stored dtype (BF16 as uint16, because numpy has no
bfloat16), so that `forge edit diff` of two models runs without importing torch.
`as_torch` converts them. Like the safetensors format, this module assumes a little-endian host.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import numpy as np

from llmforge.safetensors_header import read_safetensors_header
from llmforge.errors import ForgeError

if TYPE_CHECKING:
    import torch

NUMPY_DTYPES = {
    "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16, "BF16": np.uint16,
    "F16": np.float16, "U32": np.uint32, "I32": np.int32, "F32": np.float32, "U64": np.uint64, "I64": np.int64,
    "F64": np.float64,
}
FLOATING_DTYPES = ("F16", "BF16", "F32", "F64")
# Rows are read and combined in blocks of at most this many elements (16 MiB of float32).
BLOCK_ELEMENTS = 1 << 22
# Raw bytes are copied between files in pieces of this size when the kernel cannot copy them itself.
COPY_BYTES = 1 << 24


def element_count(shape: Iterable[int]) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count


def row_blocks(shape: tuple[int, ...], block_elements: int | None = None) -> Iterator[tuple[int, int]]:
    """Yield [start, stop) ranges of dimension 0 that cover a tensor in blocks of at most `block_elements` elements.

    A 0-d tensor is one block (0, 1). A single row larger than the limit is a block of its own.
    """
    if not shape:
        yield 0, 1
        return
    row_size = max(1, element_count(shape[1:]))
    rows_per_block = max(1, (block_elements or BLOCK_ELEMENTS) // row_size)
    for start in range(0, shape[0], rows_per_block):
        yield start, min(start + rows_per_block, shape[0])
    if shape[0] == 0:
        yield 0, 0


def as_float32(array: np.ndarray, dtype: str) -> np.ndarray:
    """Return `array` (stored dtype `dtype`) as float32, converting BF16 bit patterns exactly."""
    if dtype == "BF16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array if array.dtype == np.float32 else array.astype(np.float32)


def as_torch(array: np.ndarray, dtype: str) -> "torch.Tensor":
    """Return a torch tensor that shares `array`'s memory, with the stored dtype (BF16 included)."""
    import torch

    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if dtype == "BF16" else tensor


def tensor_buffer(tensor: "torch.Tensor") -> np.ndarray:
    """Return the bytes of a CPU tensor as a uint8 array that shares its memory (after making it contiguous)."""
    import torch

    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy()


class SafetensorsFile:
    """A safetensors file, checked by `read_safetensors_header` and read with positioned reads."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ForgeError(f"safetensors file not found: {self.path}")
        header = read_safetensors_header(self.path)
        self.metadata: dict[str, str] = dict(header.pop("__metadata__", None) or {})
        self.entries: dict[str, dict[str, Any]] = header
        self._handle = open(self.path, "rb")
        (header_length,) = struct.unpack("<Q", self._handle.read(8))
        self.data_start = 8 + header_length

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._handle.close()

    def names(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> str:
        """Return the safetensors dtype string of a tensor, such as F32 or BF16."""
        return self.entries[name]["dtype"]

    def byte_range(self, name: str) -> tuple[int, int]:
        """Return the [begin, end) file offsets of a tensor's bytes."""
        begin, end = self.entries[name]["data_offsets"]
        return self.data_start + begin, self.data_start + end

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Read rows [start, stop) of dimension 0 of a tensor (all of it by default) in its stored dtype."""
        dtype, shape = self.dtype(name), self.shape(name)
        if dtype not in NUMPY_DTYPES:
            raise ForgeError(f"{self.path}: tensor {name!r} has dtype {dtype}, which forge cannot read")
        item_size = np.dtype(NUMPY_DTYPES[dtype]).itemsize
        begin = self.byte_range(name)[0]
        if shape:
            stop = shape[0] if stop is None else stop
            row_bytes = element_count(shape[1:]) * item_size
            begin += start * row_bytes
            shape = (stop - start, *shape[1:])

        array = np.empty(element_count(shape), dtype=NUMPY_DTYPES[dtype])
        view, offset = memoryview(array).cast("B"), begin
        while view.nbytes:
            count = os.preadv(self._handle.fileno(), [view], offset)
            if count == 0:
                raise ForgeError(f"{self.path} ended before the data of tensor {name!r}; the file is truncated")
            view, offset = view[count:], offset + count
        return array.reshape(shape)


class SafetensorsWriter:
    """A safetensors file written front to back: the header from the tensor list, then each tensor's bytes in order.

    The header is written first, so the tensors never need to be in memory together. `finish`
    raises ForgeError unless exactly the declared bytes were written.
    """

    def __init__(self, handle, tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> None:
        header: dict[str, Any] = {"__metadata__": dict(metadata)}
        self._sizes: list[tuple[str, int]] = []
        offset = 0
        for name, dtype, shape in tensors:
            size = element_count(shape) * np.dtype(NUMPY_DTYPES[dtype]).itemsize
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._sizes.append((name, size))
            offset += size
        encoded = _encode_header(header)

        handle.flush()
        self._fd = handle.fileno()
        self._write(struct.pack("<Q", len(encoded)) + encoded)
        self._index, self._written = 0, 0

    def _write(self, data) -> None:
        view = memoryview(data).cast("B")
        while view.nbytes:
            view = view[os.write(self._fd, view):]

    def _advance(self, count: int) -> None:
        """Account `count` bytes of the current tensor; raise ForgeError when they overrun it."""
        if self._index >= len(self._sizes):
            raise ForgeError("more tensor data was written than the safetensors header declares")
        name, size = self._sizes[self._index]
        self._written += count
        if self._written > size:
            raise ForgeError(f"tensor {name!r} got {self._written} bytes but the header declares {size}")
        if self._written == size:
            self._index, self._written = self._index + 1, 0

    def write(self, array: np.ndarray) -> None:
        """Append the bytes of a C-contiguous array (all or part of the current tensor)."""
        self._advance(array.nbytes)
        self._write(np.ascontiguousarray(array))

    def copy_from(self, source: SafetensorsFile, name: str) -> None:
        """Append the stored bytes of tensor `name` of `source`, copied by the kernel where it can."""
        begin, end = source.byte_range(name)
        self._advance(end - begin)
        source_fd = source._handle.fileno()
        while begin < end:
            try:
                count = os.copy_file_range(source_fd, self._fd, min(end - begin, 1 << 30), begin)
            except OSError:
                count = 0
            if count == 0:  # another file system, or an old kernel: copy through memory
                data = os.pread(source_fd, min(end - begin, COPY_BYTES), begin)
                if not data:
                    raise ForgeError(f"{source.path} ended before the data of tensor {name!r}; the file is truncated")
                self._write(data)
                count = len(data)
            begin += count

    def finish(self) -> None:
        if self._index != len(self._sizes):
            name, size = self._sizes[self._index]
            raise ForgeError(f"tensor {name!r} got {self._written} of its {size} bytes before the file was closed")


def _encode_header(header: dict[str, Any]) -> bytes:
    """Encode a safetensors header as JSON, padded with spaces to a multiple of 8 bytes as the format recommends."""
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return encoded + b" " * (-len(encoded) % 8)


class ModelWeights:
    """The safetensors files of an HF model directory, open for positioned reads of one tensor at a time."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.files = [SafetensorsFile(path) for path in sorted(self.directory.glob("*.safetensors"))]
        if not self.files:
            raise ForgeError(f"{directory} has no safetensors weights; forge reads model weights from safetensors "
                             "files only")
        self._owners = {name: file for file in self.files for name in file.names()}

    def __enter__(self) -> "ModelWeights":
        return self

    def __exit__(self, *exc_info) -> None:
        for file in self.files:
            file.close()

    def names(self) -> list[str]:
        return sorted(self._owners)

    def __contains__(self, name: str) -> bool:
        return name in self._owners

    def shape(self, name: str) -> tuple[int, ...]:
        return self._owners[name].shape(name)

    def dtype(self, name: str) -> str:
        return self._owners[name].dtype(name)

    def is_floating(self, name: str) -> bool:
        return self.dtype(name) in FLOATING_DTYPES

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self._owners[name].read(name, start, stop)
