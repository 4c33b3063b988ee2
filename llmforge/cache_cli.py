"""``forge cache``: list, inspect, verify and clean the shared tensor cache."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import click

from llmforge.cache import Cache
from llmforge.errors import ForgeError


def _human_size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


def _last_used(ref: Path) -> str:
    stamp = datetime.datetime.fromtimestamp(ref.stat().st_mtime, datetime.timezone.utc)
    return stamp.isoformat(timespec="seconds")


def _entry_row(cache: Cache, ref: Path, record: dict) -> dict:
    return {
        "key": record.get("key_digest", ref.stem),
        "kind": record.get("kind"),
        "inputs": record.get("inputs", {}),
        "params": record.get("params", {}),
        "format": record.get("format"),
        "size": record.get("size", 0),
        "created": record.get("created"),
        "last_used": _last_used(ref),
        "blob": str(cache.blob_path(record)),
    }


def _print(document, as_json: bool, text: str) -> None:
    if as_json:
        click.echo(json.dumps(document, indent=2, sort_keys=True))
    elif text:
        click.echo(text)


def _resolve_keys(cache: Cache, keys: tuple[str, ...]) -> list[Path]:
    refs = []
    for key in keys:
        matches = cache.find(key)
        if not matches:
            raise ForgeError(f"no cache entry matches key {key!r}; list the keys with `forge cache ls`")
        if len(matches) > 1:
            raise ForgeError(f"key {key!r} matches {len(matches)} entries; give more hex digits")
        refs.extend(matches)
    return refs


@click.group(name="cache")
def cache_group() -> None:
    """Manage the shared tensor cache ($FORGE_CACHE, else ~/.cache/llmforge on Linux)."""


@cache_group.command(name="ls")
@click.option("--kind", help="Show only entries of this kind (for example converted-model, eval-score).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document instead of a table.")
def ls_command(kind: str | None, as_json: bool) -> None:
    """List cache entries with their kind, size, creation time and last use."""
    cache = Cache()
    rows = [_entry_row(cache, ref, record) for ref, record in cache.records() if record and (kind is None or record.get("kind") == kind)]
    lines = [f"{row['key'][:12]}  {row['kind']:<18} {_human_size(row['size']):>9}  last used {row['last_used']}" for row in rows]
    total = sum(row["size"] for row in rows)
    lines.append(f"{len(rows)} entries, {_human_size(total)} in {cache.root}")
    _print({"schema": "llmforge.cache/1", "root": str(cache.root), "entries": rows}, as_json, "\n".join(lines))


@cache_group.command(name="info")
@click.argument("keys", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document instead of text.")
def info_command(keys: tuple[str, ...], as_json: bool) -> None:
    """Show the full record of the entries whose key digests start with KEYS."""
    cache = Cache()
    rows = []
    for ref in _resolve_keys(cache, keys):
        record = json.loads(ref.read_text())
        rows.append({**_entry_row(cache, ref, record), "metadata": record.get("metadata", {})})
    text = "\n\n".join(json.dumps(row, indent=2, sort_keys=True) for row in rows)
    _print({"schema": "llmforge.cache/1", "entries": rows}, as_json, text)


@cache_group.command(name="verify")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document instead of text.")
def verify_command(as_json: bool) -> None:
    """Check every entry against its content digest; exit with status 1 if any is corrupt or dangling."""
    cache = Cache()
    problems = cache.verify()
    text = "\n".join(f"{p['entry']}: {p['problem']}" for p in problems) or f"all {len(cache.records())} entries are intact"
    if problems:
        text += "\nremove the broken entries with `forge cache rm KEY` (KEY from `forge cache ls`), then `forge cache gc`"
    _print({"schema": "llmforge.cache/1", "ok": not problems, "problems": problems}, as_json, text)
    if problems:
        raise click.exceptions.Exit(1)


@cache_group.command(name="rm")
@click.argument("keys", nargs=-1)
@click.option("--kind", help="Remove every entry of this kind.")
@click.option("--all", "remove_all", is_flag=True, help="Remove every entry.")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document instead of text.")
def rm_command(keys: tuple[str, ...], kind: str | None, remove_all: bool, dry_run: bool, as_json: bool) -> None:
    """Remove the entries whose key digests start with KEYS (or --kind, or --all), then unused blobs."""
    cache = Cache()
    if not keys and not kind and not remove_all:
        raise ForgeError("name the entries to remove: KEYS, --kind KIND or --all")
    refs = _resolve_keys(cache, keys)
    refs += [ref for ref, record in cache.records() if remove_all or (kind and record and record.get("kind") == kind)]
    refs = sorted(set(refs))
    if not dry_run:
        cache.remove(refs)
    verb = "would remove" if dry_run else "removed"
    _print({"schema": "llmforge.cache/1", "dry_run": dry_run, "removed": [str(r) for r in refs]}, as_json, f"{verb} {len(refs)} entries")


@cache_group.command(name="gc")
@click.option("--unused-days", type=click.FloatRange(min=0), help="Also remove entries not used for this many days.")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document instead of text.")
def gc_command(unused_days: float | None, dry_run: bool, as_json: bool) -> None:
    """Remove blobs no entry uses and leftovers of interrupted writes older than an hour."""
    cache = Cache()
    removed = cache.gc(unused_days=unused_days, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    lines = [f"{verb} {path}" for path in removed] + [f"{verb} {len(removed)} paths"]
    _print({"schema": "llmforge.cache/1", "dry_run": dry_run, "removed": [str(p) for p in removed]}, as_json, "\n".join(lines))
