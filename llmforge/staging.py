"""Names of the staging entries of atomic writes, and removal of those that killed writers left.

``llmforge.checkpoint`` writes a file or directory NAME under a temporary name beside it and renames
it when complete. That temporary entry is named ".NAME.HOSTTAG-PID-RANDOM.tmp", and a directory that
an overwrite moves aside is ".NAME.HOSTTAG-PID-RANDOM.old". HOSTTAG and PID name the writing process,
so a later writer can tell the entries of a process that was killed from those of one still running.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import shutil
import socket
from pathlib import Path


@functools.lru_cache(maxsize=1)
def _host_tag() -> str:
    """Return 8 hex digits that identify this host name and PID namespace in staging names.

    Process ids are compared only between processes with the same tag. The PID namespace is part of
    it because containers that share a host name and a volume each number their processes anew.
    """
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return hashlib.sha256(f"{socket.gethostname()}\0{namespace}".encode()).hexdigest()[:8]


def staging_prefix(path: Path) -> str:
    """Return the name prefix of this process's staging entries for ``path``: ".NAME.HOSTTAG-PID-"."""
    return f".{path.name}.{_host_tag()}-{os.getpid()}-"


# The part of a staging entry's name after ".NAME.": host tag, owner pid, the random part of mkstemp
# or mkdtemp (letters, digits and "_", never "."), and the kind.
_STAGING_SUFFIX = re.compile(r"(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)-[A-Za-z0-9_]+\.(?P<kind>tmp|old)")


def _process_exists(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def remove_stale_staging(path: str | os.PathLike) -> list[Path]:
    """Remove the staging entries that killed writers of ``path`` left beside it, and return them.

    An entry is removed only when its name carries this host's tag and the pid of a process that
    no longer exists. Entries of live writers, of other hosts and of older forge versions (without
    an owner in the name) are kept. A pid that a new process has reused keeps its entry until that
    process exits too. A ".old" directory contains the previous output that a killed overwrite had
    moved aside. When ``path`` is missing, that output is moved back, so the kill leaves the old output.
    """
    path = Path(path)
    prefix = f".{path.name}."
    try:
        names = [name for name in os.listdir(path.parent) if name.startswith(prefix)]
    except OSError:
        return []

    removed = []
    # ".old" sorts before ".tmp" for the same owner, so an old output is moved back before anything else happens.
    for name in sorted(names, key=lambda name: not name.endswith(".old")):
        match = _STAGING_SUFFIX.fullmatch(name[len(prefix):])
        if match is None or match["host"] != _host_tag() or _process_exists(int(match["pid"])):
            continue
        entry = path.parent / name
        if match["kind"] == "old" and not os.path.lexists(path):
            with contextlib.suppress(OSError):
                os.rename(entry / path.name, path)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
        removed.append(entry)
    return removed
