"""Crash-safe writes and content hashes, shared by every part of capvector.

A reader never sees a half-written output: each writer fills a temporary path beside the target (same
file system, so the final rename is atomic) and renames it over the target only once it is complete. A
failure or a kill leaves the target as it was; the temporary path is removed on failure, and its name
(`.NAME.tmp-PID`) marks it as debris if the process was killed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def temporary_path(target: Path) -> Path:
    """A hidden sibling of `target` that names this process: the place to build `target` before renaming it."""
    return target.with_name(f".{target.name}.tmp-{os.getpid()}")


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(target: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `target` to write a file or a folder at; on success it is renamed over
    `target` (an existing target is replaced when `replace`, else FileExistsError), on any exception removed.

    An existing folder is swapped out by two renames, and the old one deleted only after the new one is in place.
    """
    target = Path(target)
    temporary = temporary_path(target)
    remove(temporary)
    try:
        yield temporary
        if target.exists() and not replace:
            raise FileExistsError(f"{target} appeared while it was being written")
        if target.is_dir() and not target.is_symlink():
            previous = target.with_name(f".{target.name}.old-{os.getpid()}")
            remove(previous)
            target.rename(previous)
            temporary.rename(target)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.replace(temporary, target)
    except BaseException:
        remove(temporary)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def write_json(path: str | Path, value: Any) -> None:
    """Write `value` as indented JSON to `path` atomically (unknown types as their str())."""
    write_text(path, json.dumps(value, indent=1, default=str) + "\n")


def read_json(path: str | Path) -> Any | None:
    """The JSON value in `path`, or None when it is missing or not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def content_hash(value: Any) -> str:
    """A short, stable hash of a JSON-able value (keys sorted, unknown types as their str())."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sha256_file(path: str | Path, block: int = 1 << 22) -> str:
    """The SHA-256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()
