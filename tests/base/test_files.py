"""eamet.base.files: the cache root, atomic writes and directories that prove their own contents."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from eamet.base.errors import CacheError
from eamet.base.files import (
    atomic_write,
    cache_dir,
    cache_root,
    read_checked_dir,
    sha256_file,
    write_checked_dir,
)


def test_cache_root_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EAMET_CACHE_DIR", str(tmp_path))
    assert cache_root() == tmp_path and cache_dir("stats") == tmp_path / "stats"
    assert cache_dir("stats", tmp_path / "mine") == tmp_path / "mine"
    monkeypatch.delenv("EAMET_CACHE_DIR")
    assert cache_root() == Path.home() / ".cache" / "eamet"


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "file.txt"
    atomic_write(target, lambda tmp: tmp.write_text("old"))

    def fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_text() == "old"
    assert [p.name for p in target.parent.iterdir()] == ["file.txt"]  # no temporary left behind


def test_checked_dir_round_trip_and_damage(tmp_path: Path) -> None:
    def fill(staging: Path) -> dict[str, object]:
        (staging / "a.bin").write_bytes(b"\x00\x01\x02")
        (staging / "b.txt").write_text("hello")
        return {"key": "k1"}

    entry = write_checked_dir(tmp_path / "entry", fill, "manifest.json")
    manifest = read_checked_dir(entry, "manifest.json", required=("a.bin",))
    assert manifest["key"] == "k1" and manifest["files"]["a.bin"] == sha256_file(entry / "a.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]  # staging renamed into place

    def refuse(found: dict[str, object]) -> None:
        raise CacheError("other key")

    with pytest.raises(CacheError, match="other key"):
        read_checked_dir(entry, "manifest.json", check=refuse)
    with pytest.raises(CacheError, match=r"lists no c\.bin"):
        read_checked_dir(entry, "manifest.json", required=("c.bin",))
    (entry / "a.bin").write_bytes(b"\x00\x01\x03")
    with pytest.raises(CacheError, match=r"a\.bin"):
        read_checked_dir(entry, "manifest.json")
    (entry / "manifest.json").write_text(json.dumps([1, 2]))
    with pytest.raises(CacheError, match="not a valid manifest"):
        read_checked_dir(entry, "manifest.json")
    # Rewriting replaces the damaged entry whole.
    write_checked_dir(entry, fill, "manifest.json")
    read_checked_dir(entry, "manifest.json")


def test_a_full_disk_is_a_storage_error_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import safetensors.torch
    import torch
    from safetensors import SafetensorError

    from eamet.base.errors import StorageError
    from eamet.model.tensor_files import atomic_save_tensors

    def no_space(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(StorageError, match=r"file\.txt: cannot write \(No space left on device\)") as info:
        atomic_write(tmp_path / "file.txt", no_space)
    assert info.value.path == str(tmp_path / "file.txt") and isinstance(info.value, OSError)

    # safetensors reports its own I/O failures as SafetensorError, not OSError.
    def full(*_a: object, **_k: object) -> None:
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(StorageError, match=r"edit\.safetensors: cannot write .*No space left"):
        atomic_save_tensors(tmp_path / "edit.safetensors", {"x": torch.zeros(2)}, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_full_disk_while_building_a_checked_dir_is_a_storage_error(tmp_path: Path) -> None:
    import errno

    from eamet.base.errors import StorageError

    def no_space(staging: Path) -> dict[str, str]:
        (staging / "texts.jsonl").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(StorageError, match=r"entry: cannot write \(No space left on device\)") as info:
        write_checked_dir(tmp_path / "entry", no_space, "manifest.json")
    assert info.value.path == str(tmp_path / "entry")
    assert list(tmp_path.iterdir()) == []  # no entry, no staging folder


def test_tensor_files_get_a_usual_files_mode(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from eamet.model.tensor_files import atomic_save_tensors

    old = os.umask(0o027)
    try:
        from eamet.base.files import new_file_mode

        assert new_file_mode() == 0o640
        path = atomic_save_tensors(tmp_path / "t.safetensors", {"x": torch.ones(2)}, {"k": "v"})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640  # not safetensors' own 0600
