"""Outputs written safely, and records of what a resumable output or cache was made from.

Write-then-rename (outputs appear complete or not at all), output folders and files that refuse to
be clobbered without ``--overwrite``, and content stamps that tell a stale cache from a valid one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden temporary sibling of ``path``; rename it onto ``path`` if the block succeeds.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden temporary sibling folder; it replaces ``path`` if the block succeeds.

    On an exception the temporary folder is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists() or path.is_symlink():
            remove_path(path)
        tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_path(path: str | os.PathLike) -> None:
    """Delete a file, a symlink (not its target) or a folder tree."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def refuse_file_as_folder(path: str | os.PathLike, flag: str, overwrite: bool) -> None:
    """Refuse an output folder path that names an existing file, unless ``overwrite``.

    Raises:
        FileExistsError: ``path`` is a file (or a link to none) and not ``overwrite``.
    """
    path = Path(path)
    if (path.is_symlink() or path.exists()) and not path.is_dir() and not overwrite:
        raise FileExistsError(
            f"{flag} '{path}' is a file, not a folder; pass --overwrite to replace it"
        )


def check_output_folder(path: str | os.PathLike, flag: str, overwrite: bool) -> None:
    """Refuse an output folder that already holds something, unless ``overwrite``.

    Raises:
        FileExistsError: ``path`` is a file, or a folder that is not empty, and not ``overwrite``.
    """
    refuse_file_as_folder(path, flag, overwrite)
    path = Path(path)
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{flag} '{path}' exists and is not empty; pass --overwrite")


def check_output_file(path: str | os.PathLike, flag: str, overwrite: bool) -> None:
    """Refuse to write a file over an existing one (unless ``overwrite``) or over a folder."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{flag} '{path}' is a folder; give the path of a file")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{flag} '{path}' exists; pass --overwrite")


def content_stamp(path: str | os.PathLike) -> dict:
    """A cheap fingerprint of a file's or folder's content, to tell whether a cache is stale.

    Returns:
        ``path`` (resolved), ``files`` (count) and ``sha256`` over every file's relative name,
        size and modification time (a rebuilt or edited input changes it; reading no contents,
        so it costs one ``stat`` per file).
    """
    root = Path(path).resolve()
    files = [root] if root.is_file() else sorted(f for f in root.rglob("*") if f.is_file())
    digest = hashlib.sha256()
    for f in files:
        st = f.stat()
        name = f.name if f == root else f.relative_to(root).as_posix()
        digest.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"path": str(root), "files": len(files), "sha256": digest.hexdigest()}


def check_record(path: str | os.PathLike, record: dict, what: str, fix: str) -> None:
    """Compare ``record`` with the one stored at ``path``; store it there when there is none.

    Args:
        path: The record file (JSON), e.g. ``OUT/run.json``.
        record: What the folder is made from: input stamps and settings, by flag name.
        what: The folder, for the message (``"--out 'eval'"``).
        fix: What the user can do (``"use another --out or pass --overwrite"``).

    Raises:
        FileExistsError: The stored record differs; the message names each differing key with
            the stored and the given value.
    """
    path = Path(path)
    record = json.loads(json.dumps(record))  # as stored (tuples become lists)
    if path.is_file():
        stored = json.loads(path.read_text())
        diffs = [k for k in sorted(set(stored) | set(record)) if stored.get(k) != record.get(k)]
        if diffs:
            shown = "; ".join(
                f"{k}: {_brief(stored.get(k))} before, {_brief(record.get(k))} now" for k in diffs
            )
            raise FileExistsError(f"{what} was made from other inputs ({shown}); {fix}")
        return
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=1))


def _brief(value: object) -> str:
    """A stamp as its path (and "changed" is told by the pair), anything else as JSON."""
    if isinstance(value, dict) and "path" in value and "sha256" in value:
        return f"'{value['path']}' ({value['files']} files, {value['sha256'][:8]})"
    return json.dumps(value)
