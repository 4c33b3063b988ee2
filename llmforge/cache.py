"""The shared tensor cache: content-addressed, immutable entries that every command reuses.

Layout under the cache root (``$FORGE_CACHE``, else the platform cache directory)::

    blobs/<sha256>.safetensors | <sha256>.json | <sha256>/   the content, named by its digest
    refs/<kind>/<key digest>.json                             a key -> blob record
    locks/<key digest>.lock                                   one lock file per key
    tmp/                                                      work in progress

A key is a kind, the digests of its inputs and its parameters; its digest names the record.
Blobs are written into ``tmp/`` and renamed into ``blobs/`` only when complete, and the record
is written into ``tmp/`` after its blob and then renamed into ``refs/``. A killed writer therefore
leaves only debris in ``tmp/``, which ``forge cache gc`` removes, and at worst a blob that no
record names yet, which gc removes too. A record's modification time is its last use.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from llmforge.checkpoint import (DiskFullError, _fsync_directory, file_digest, load_tensors, save_tensors,
                                 write_json)
from llmforge.errors import ForgeError

if TYPE_CHECKING:
    import torch

KIND_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
FORMAT_SUFFIXES = {"tensors": ".safetensors", "json": ".json", "dir": ""}

# Debris in tmp/ younger than this may belong to a writer that is still running.
STALE_TEMPORARY_SECONDS = 3600
# A blob's name is the sha256 of its content plus the format's suffix, so a record cannot name a
# path outside blobs/ (such as ../../etc/passwd) even when someone edits it.
BLOB_NAME_PATTERN = re.compile(r"^[0-9a-f]{64}(\.safetensors|\.json)?$")


def default_cache_root() -> Path:
    """Return ``$FORGE_CACHE``, else the platform's user cache directory plus ``llmforge``."""
    if os.environ.get("FORGE_CACHE"):
        return Path(os.environ["FORGE_CACHE"]).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "llmforge"
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "llmforge" / "Cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmforge"


@dataclass(frozen=True)
class CacheKey:
    """The identity of a cache entry: a kind, the digests of its inputs, and its parameters."""

    kind: str
    inputs: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not KIND_PATTERN.match(self.kind):
            raise ValueError(f"invalid cache kind {self.kind!r}: use lowercase letters, digits, '.', '_' and '-'")

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "inputs": dict(self.inputs), "params": dict(self.params)}

    @property
    def digest(self) -> str:
        """The sha256 hex digest of the canonical JSON form of the key."""
        canonical = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()


def directory_digest(path: Path) -> str:
    """Return ``sha256:<hex>`` over the relative names and contents of every file below ``path``."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}|{file_digest(file)}\n".encode())
    return f"sha256:{digest.hexdigest()}"


def _is_record(record: Any) -> bool:
    """Return whether parsed JSON is a cache record whose blob name is a content digest."""
    return isinstance(record, dict) and isinstance(record.get("blob"), str) and bool(BLOB_NAME_PATTERN.match(record["blob"]))


def _blob_digest(path: Path) -> str:
    return directory_digest(path) if path.is_dir() else file_digest(path)


def _size_of(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _publish(work: Path, blob: Path) -> None:
    try:
        os.replace(work, blob)
    except OSError:
        # A directory cannot replace a non-empty one: another process stored the same content first.
        if not blob.exists():
            raise
        _remove(work)


class Cache:
    """One cache directory, safe to share between concurrent processes on one machine.

    NOTE: the per-key lock is ``fcntl.flock``, so the cache needs a POSIX system and a local
    file system (flock is not reliable on every network file system).
    """

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_root()
        if self.root.exists() and not self.root.is_dir():
            raise ForgeError(f"the cache path {self.root} is a file, not a directory; set FORGE_CACHE to a directory")
        self.blobs = self.root / "blobs"
        self.refs = self.root / "refs"
        self.locks = self.root / "locks"
        self.tmp = self.root / "tmp"

    def _ensure_layout(self) -> None:
        try:
            for directory in (self.blobs, self.refs, self.locks, self.tmp):
                directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ForgeError(f"cannot create the cache in {self.root} ({error}); set FORGE_CACHE to a writable directory") from None

    def ref_path(self, key: CacheKey) -> Path:
        return self.refs / key.kind / f"{key.digest}.json"

    def blob_path(self, record: Mapping[str, Any]) -> Path:
        """Return the path of the blob that `record` names; ForgeError when the name is not a blob name."""
        name = record.get("blob")
        if not isinstance(name, str) or not BLOB_NAME_PATTERN.match(name):
            raise ForgeError(f"invalid cache record: blob {name!r} is not a content digest; "
                             "run `forge cache verify` and remove the entries it lists")
        return self.blobs / name

    # Reading

    def lookup(self, key: CacheKey) -> dict[str, Any] | None:
        """Return the entry record for ``key`` and mark it used, or None when it is not cached."""
        ref = self.ref_path(key)
        try:
            record = json.loads(ref.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        if not _is_record(record) or not self.blob_path(record).exists():
            return None
        with contextlib.suppress(OSError):
            os.utime(ref)
        return record

    def lookup_json(self, key: CacheKey) -> Any | None:
        """Return the JSON document cached under ``key``, or None when it is not cached; never computes."""
        record = self.lookup(key)
        if record is None:
            return None
        return self._read_json_blob(key, record)

    def _read_json_blob(self, key: CacheKey, record: Mapping[str, Any]) -> Any:
        """Read a JSON entry after checking its bytes against the digest in its blob name.

        JSON entries are small (scores, summaries), so the check costs little and an edited or
        damaged score is never reported as a result. Tensor entries are checked by `forge cache verify`.
        """
        raw = self.blob_path(record).read_bytes()
        if hashlib.sha256(raw).hexdigest() != record["blob"].split(".", 1)[0]:
            raise ForgeError(f"the cache entry {key.digest[:16]} ({key.kind}) is corrupt: its content no longer "
                             f"matches its digest; remove it with `forge cache rm {key.digest[:16]}` and rerun")
        return json.loads(raw)

    # Writing

    @contextlib.contextmanager
    def _key_lock(self, key: CacheKey) -> Iterator[None]:
        self._ensure_layout()
        with open(self.locks / f"{key.digest}.lock", "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _naming_full_disk(self) -> Iterator[None]:
        """Report a full disk while an entry is written as DiskFullError naming the cache, not a file in tmp/.

        Writers in tmp/ fail with OSError (plain open()) or DiskFullError (llmforge.checkpoint), whose
        path and advice ("write the output elsewhere") would point the user at the wrong place.
        """
        try:
            yield
        except (OSError, DiskFullError) as error:
            number = getattr(error, "errno", None)
            where = getattr(error, "filename", None)
            elsewhere = (isinstance(where, (str, os.PathLike))
                         and Path(os.path.abspath(self.root)) not in Path(os.path.abspath(where)).parents)
            if number not in (errno.ENOSPC, errno.EDQUOT) or elsewhere:
                raise
            full = DiskFullError(f"cannot write to the cache in {self.root}: {os.strerror(number).lower()}; free space "
                                 "on its file system (`forge cache gc --unused-days N` removes entries unused for N "
                                 "days) or set FORGE_CACHE to a directory on another file system")
            full.errno = number
            raise full from error

    def _get_or_create(self, key: CacheKey, fmt: str, produce: Callable[[Path], None], metadata: Mapping[str, str] | None) -> dict[str, Any]:
        record = self.lookup(key)
        if record is not None:
            return record

        with self._naming_full_disk(), self._key_lock(key):
            record = self.lookup(key)
            if record is not None:
                return record

            work = self.tmp / f"{key.digest}.{os.getpid()}.{time.monotonic_ns()}{FORMAT_SUFFIXES[fmt]}"
            try:
                produce(work)
                digest = _blob_digest(work).removeprefix("sha256:")
                blob = self.blobs / f"{digest}{FORMAT_SUFFIXES[fmt]}"
                if blob.exists():
                    _remove(work)  # identical content is already stored under another key
                else:
                    _publish(work, blob)
            except BaseException:
                _remove(work)
                raise

            record = {
                **key.as_dict(),
                "key_digest": key.digest,
                "blob": blob.name,
                "format": fmt,
                "size": _size_of(blob),
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "metadata": dict(metadata or {}),
            }
            self._write_record(key, record, work)
            return record

    def _write_record(self, key: CacheKey, record: Mapping[str, Any], work: Path) -> None:
        # The record is staged in tmp/ like the blob, because a killed writer's temporary file
        # beside the ref would stay in refs/, where gc never looks.
        ref = self.ref_path(key)
        ref.parent.mkdir(exist_ok=True)
        staged = work.with_name(f"{work.name}.record.json")
        write_json(staged, record)
        os.replace(staged, ref)
        _fsync_directory(ref.parent)

    def get_or_compute(
        self,
        key: CacheKey,
        compute: Callable[[], dict[str, "torch.Tensor"]],
        metadata: Mapping[str, str] | None = None,
    ) -> dict[str, "torch.Tensor"]:
        """Return the tensors cached under ``key``, computing and storing them once if absent.

        Concurrent callers with the same key wait on one lock, so ``compute`` runs once. The
        result is read back from the blob as memory-mapped tensors.
        """
        produce = lambda path: save_tensors(path, compute(), dict(metadata or {}))  # noqa: E731
        record = self._get_or_create(key, "tensors", produce, metadata)
        return load_tensors(self.blob_path(record))

    def get_or_write_tensors(self, key: CacheKey, write: Callable[[Path], None],
                             metadata: Mapping[str, str] | None = None) -> Path:
        """Return the safetensors blob under ``key``; if absent, ``write`` streams it to the given path once.

        For producers too large to hold in memory: ``write`` writes a complete safetensors file
        itself, and the cache only hashes and publishes it.
        """
        record = self._get_or_create(key, "tensors", write, metadata)
        return self.blob_path(record)

    def get_or_compute_json(self, key: CacheKey, compute: Callable[[], Any]) -> Any:
        """Return the JSON document cached under ``key``, computing and storing it once if absent."""
        record = self._get_or_create(key, "json", lambda path: write_json(path, compute()), None)
        return self._read_json_blob(key, record)

    def get_or_compute_dir(self, key: CacheKey, fill: Callable[[Path], None], metadata: Mapping[str, str] | None = None) -> Path:
        """Return the directory cached under ``key``; if absent, ``fill`` writes it into an empty directory once."""

        def produce(path: Path) -> None:
            path.mkdir()
            fill(path)

        record = self._get_or_create(key, "dir", produce, metadata)
        return self.blob_path(record)

    def put_json(self, key: CacheKey, document: Any) -> None:
        """Store ``document`` under ``key`` unless an entry exists already."""
        self.get_or_compute_json(key, lambda: document)

    # Maintenance

    def records(self) -> list[tuple[Path, dict[str, Any] | None]]:
        """Return every record file with its parsed content (None when it cannot be parsed)."""
        entries = []
        for ref in sorted(self.refs.glob("*/*.json")):
            try:
                record = json.loads(ref.read_text())
                if not _is_record(record):
                    record = None
            except (json.JSONDecodeError, UnicodeDecodeError, OSError):
                record = None
            entries.append((ref, record))
        return entries

    def find(self, prefix: str) -> list[Path]:
        """Return the record files whose key digest starts with the hex string ``prefix``."""
        if not re.fullmatch(r"[0-9a-f]{4,64}", prefix):
            raise ForgeError(f"invalid cache key {prefix!r}: give at least 4 hex digits of a key from `forge cache ls`")
        return sorted(self.refs.glob(f"*/{prefix}*.json"))

    def verify(self) -> list[dict[str, str]]:
        """Check every record and blob; return one problem dict per corrupt or dangling entry.

        A record must parse and point to an existing blob, and a blob's content must match
        the digest in its name. Debris in ``tmp/`` is not a problem: no record points to it.
        """
        problems = []
        for ref, record in self.records():
            if record is None:
                problems.append({"entry": str(ref), "problem": "record is not valid JSON or names no valid blob"})
            elif not self.blob_path(record).exists():
                problems.append({"entry": str(ref), "problem": f"blob {record['blob']} is missing"})

        for blob in sorted(self.blobs.glob("*")) if self.blobs.exists() else []:
            expected = blob.name.split(".", 1)[0]
            actual = _blob_digest(blob).removeprefix("sha256:")
            if actual != expected:
                problems.append({"entry": str(blob), "problem": f"content digest is {actual[:16]}..., not {expected[:16]}..."})
        return problems

    def unreferenced(self) -> tuple[list[Path], list[Path]]:
        """Return blobs no record points to, and ``tmp/`` debris older than an hour."""
        referenced = {record["blob"] for _, record in self.records() if record is not None}
        orphans = [blob for blob in sorted(self.blobs.glob("*")) if blob.name not in referenced] if self.blobs.exists() else []
        cutoff = time.time() - STALE_TEMPORARY_SECONDS
        debris = [path for path in sorted(self.tmp.glob("*")) if path.lstat().st_mtime < cutoff] if self.tmp.exists() else []
        return orphans, debris

    def remove(self, refs: list[Path]) -> None:
        """Delete the given records, then the blobs that no record points to any more."""
        for ref in refs:
            ref.unlink(missing_ok=True)
        orphans, _ = self.unreferenced()
        for blob in orphans:
            _remove(blob)

    def gc(self, *, unused_days: float | None = None, dry_run: bool = False) -> list[Path]:
        """Remove unreferenced blobs, stale ``tmp/`` debris and, if given, records unused for ``unused_days``.

        Returns what was (or with ``dry_run`` would be) removed.
        """
        stale_refs = []
        if unused_days is not None:
            cutoff = time.time() - unused_days * 86400
            stale_refs = [ref for ref, _ in self.records() if ref.stat().st_mtime < cutoff]
        referenced = {record["blob"] for ref, record in self.records() if record is not None and ref not in stale_refs}
        blobs = [blob for blob in sorted(self.blobs.glob("*")) if blob.name not in referenced] if self.blobs.exists() else []
        _, debris = self.unreferenced()

        doomed = stale_refs + blobs + debris
        if not dry_run:
            for path in doomed:
                _remove(path)
        return doomed
