"""Files eamet writes: the cache root, atomic writes, and directories that prove their own contents.

Everything eamet caches or saves goes through here, so that a reader never sees a half-written file and a
damaged entry is noticed before it is used:

* :func:`atomic_write` writes a temporary sibling and renames it into place (``StorageError`` naming
  the file when it cannot: a full disk, no permission);
* :func:`write_checked_dir` fills a staging directory, records the SHA-256 of every file in a manifest,
  and renames the directory into place; :func:`read_checked_dir` verifies every file before returning the
  manifest (``CacheError`` naming the first file that is missing or differs).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from eamet.base.errors import CacheError, StorageError

__all__ = [
    "atomic_write",
    "cache_dir",
    "cache_root",
    "new_file_mode",
    "read_checked_dir",
    "sha256_file",
    "write_checked_dir",
]

CACHE_ENV = "EAMET_CACHE_DIR"


def cache_root() -> Path:
    """``$EAMET_CACHE_DIR``, else ``~/.cache/eamet``: the root of every eamet cache."""
    root = os.environ.get(CACHE_ENV)
    return Path(root) if root else Path.home() / ".cache" / "eamet"


def cache_dir(kind: str, override: str | os.PathLike[str] | None = None) -> Path:
    """``override`` if given, else the ``kind`` folder (``"stats"``, ``"pocket"``, ``"models"`` ...) of
    :func:`cache_root`."""
    return Path(override) if override is not None else cache_root() / kind


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0o666 less this process's umask (read from /proc on Linux,
    where asking ``os.umask`` would change it for every thread for a moment)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Calls ``write(tmp)`` on a temporary sibling of ``path``, then renames it to ``path``: readers see
    the old file or the new one, never a partial one. The temporary file is removed on failure.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        tmp.replace(target)
    except OSError as exc:
        if isinstance(exc, StorageError):
            raise
        raise StorageError(f"{target}: cannot write ({exc.strerror or exc})", path=str(target)) from exc
    finally:
        tmp.unlink(missing_ok=True)
    return target


def write_checked_dir(
    directory: str | os.PathLike[str], fill: Callable[[Path], Mapping[str, Any]], manifest_name: str
) -> Path:
    """Builds a directory atomically: ``fill(staging)`` writes the files into a temporary sibling and
    returns the manifest's other fields; the manifest (those fields plus ``"files"``: the SHA-256 of every
    file) is written as ``manifest_name``, and the staging directory is renamed into place.

    There is never a moment without an entry: an old entry is renamed aside, the new one renamed in, the
    old one removed. If another process put an entry in place meanwhile, that one is kept. A write that
    fails (a full disk) is a ``StorageError`` naming ``directory``, and leaves no staging folder behind.
    """
    target = Path(directory)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    except OSError as exc:
        raise StorageError(f"{target}: cannot write ({exc.strerror or exc})", path=str(target)) from exc
    try:
        fields = dict(fill(staging))
        fields["files"] = {p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.is_file()}
        (staging / manifest_name).write_text(json.dumps(fields, indent=1) + "\n", encoding="utf-8")
        staging.chmod(0o755)
        old = target.with_name(f".{target.name}-old-{os.getpid()}")
        if target.exists():
            target.replace(old)
        try:
            staging.replace(target)
        except OSError:
            if not target.exists():
                raise
        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        if isinstance(exc, StorageError):
            raise
        raise StorageError(f"{target}: cannot write ({exc.strerror or exc})", path=str(target)) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def read_checked_dir(
    directory: str | os.PathLike[str],
    manifest_name: str,
    required: Sequence[str] = (),
    check: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The manifest of a directory written by :func:`write_checked_dir`, after checking that it lists
    every name in ``required``, that ``check(manifest)`` accepts it (it raises to refuse; called before
    any file is hashed), and that every listed file matches its SHA-256.

    Raises ``CacheError`` naming the manifest (unreadable, or lacking a required file) or the first file
    that is missing or differs.
    """
    directory = Path(directory)
    manifest_path = directory / manifest_name
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = dict(manifest["files"])
        absent = [name for name in required if name not in files]
        if absent:
            raise ValueError(f"lists no {', '.join(absent)}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CacheError(f"{manifest_path}: not a valid manifest ({exc})", path=str(manifest_path)) from None
    if check is not None:
        check(manifest)
    for name, digest in files.items():
        path = directory / name
        if not path.is_file() or sha256_file(path) != digest:
            raise CacheError(f"{path}: missing or does not match its recorded SHA-256", path=str(path))
    return dict(manifest)
