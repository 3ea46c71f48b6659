"""Crash-safe file writes: write to a temporary file beside the target, fsync, then rename.

A crash at any moment leaves either the old file or the new one, never a torn mix.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# what a plain open() would give a new file: mkstemp's temporary files are owner-only (0600)
NEW_FILE_MODE = 0o666 & ~_umask()


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp_path) then atomically move tmp_path to path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        _fsync(tmp_path)
        os.chmod(tmp_path, NEW_FILE_MODE)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def replace_dir(staging: Path, target: Path) -> None:
    """Swap a fully written directory `staging` into place at `target`.

    The old target is renamed aside before the new one is renamed in, so at every instant either
    `target` or `target.old` is a complete directory (readers fall back to `.old`).
    """
    old = target.with_name(target.name + ".old")
    if old.exists():
        if target.exists():
            shutil.rmtree(old)
        else:  # a previous swap died between its two renames: old is the good copy
            old.rename(target)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    if old.exists():
        shutil.rmtree(old)


def move_files_into(staging: Path, target: Path) -> list[str]:
    """Move every file of the fully written, flat directory `staging` into `target` (created if need be), one
    atomic rename per file, and remove `staging`; returns the names moved.

    Only those names are replaced: `target`'s other files and folders (a `.git`, notes) stay, and a crash
    leaves each file whole, old or new.
    """
    target.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in staging.iterdir())
    for name in names:
        _fsync(staging / name)
        os.replace(staging / name, target / name)
    staging.rmdir()
    return names


def existing_dir(target: Path) -> Path | None:
    """`target` if it is there, else the `.old` copy an interrupted replace_dir left, else None."""
    if target.is_dir():
        return target
    old = target.with_name(target.name + ".old")
    return old if old.is_dir() else None
