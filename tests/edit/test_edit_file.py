"""An edit file proves its own contents: every tensor and the metadata carry a SHA-256 that ``load``
checks before any weight is touched; files of the first format (no checksums) still load.

tests/data/edit-format1.safetensors was written by eamet 0.1.0 before checksums existed (a MEMIT edit of
3 facts into ``small_model("gpt2")`` with ``small_config``; see the commit that added it)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from eamet.base.errors import CacheError
from eamet.edit.results import FILE_FORMAT, EditResult
from editing_helpers import changed, make_editor, small_config, small_facts, small_model, snapshot
from tiny import bpe_tokenizer

FORMAT1 = Path(__file__).resolve().parent.parent / "data" / "edit-format1.safetensors"


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = bpe_tokenizer(add_bos=False, vocab_size=256)
    model = small_model("gpt2")
    root = tmp_path_factory.mktemp("edit")
    result = make_editor(model, tok, small_config(model, "eamet"), root / "stats").edit(
        small_facts(3), progress=False
    )
    path = root / "edit.safetensors"
    result.save(path)
    return path


def _header(path: Path) -> tuple[int, dict[str, Any]]:
    size = struct.unpack("<Q", path.read_bytes()[:8])[0]
    return size, json.loads(path.read_bytes()[8 : 8 + size])


def _flip(path: Path, offset: int, out: Path) -> Path:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    out.write_bytes(bytes(data))
    return out


def test_a_saved_edit_records_and_passes_its_checksums(saved: Path) -> None:
    _, header = _header(saved)
    meta = json.loads(header["__metadata__"]["eamet"])
    assert meta["format"] == FILE_FORMAT == 2
    tensors = {k for k in header if k != "__metadata__"}
    assert set(meta["tensor_sha256"]) == tensors and len(tensors) > 3
    EditResult.load(saved)  # no error, no warning


def test_a_flipped_byte_in_the_last_tensor_is_refused_before_any_weight_changes(
    saved: Path, tmp_path: Path
) -> None:
    size, header = _header(saved)
    last = max((v["data_offsets"][1], k) for k, v in header.items() if k != "__metadata__")
    damaged = _flip(saved, 8 + size + last[0] - 1, tmp_path / "damaged.safetensors")
    model = small_model("gpt2")
    before = snapshot(model)
    with pytest.raises(CacheError, match=f"tensor '{last[1]}' does not match its SHA-256"):
        EditResult.load(damaged).apply(model)
    assert changed(model, before) == set()


def test_a_changed_fact_in_the_metadata_is_refused(saved: Path, tmp_path: Path) -> None:
    raw = saved.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = raw[8 : 8 + size].decode()
    name = small_facts(3)[0].subject
    forged = header.replace(name, name[:-1] + chr(ord(name[-1]) ^ 1), 1)
    assert forged != header and len(forged) == len(header)
    path = tmp_path / "forged.safetensors"
    path.write_bytes(raw[:8] + forged.encode() + raw[8 + size :])
    with pytest.raises(CacheError, match="metadata does not match its SHA-256"):
        EditResult.load(path)


@pytest.mark.parametrize("content", [b"", b"\x00" * 7])
def test_empty_and_truncated_files_are_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(content)
    with pytest.raises(CacheError):
        EditResult.load(path)


def test_a_file_of_the_first_format_still_loads_with_a_warning() -> None:
    with pytest.warns(UserWarning, match="format 1"):
        loaded = EditResult.load(FORMAT1)
    assert [f.subject for f in loaded.facts] == [f.subject for f in small_facts(3)]
    assert loaded.config.method == "memit" and len(loaded.updates) == len(loaded.config.layers)
    assert loaded.deltas.shape[0] == 3 and loaded.misalignment is not None


def test_resaving_a_first_format_file_adds_checksums(tmp_path: Path) -> None:
    with pytest.warns(UserWarning):
        loaded = EditResult.load(FORMAT1)
    path = tmp_path / "again.safetensors"
    loaded.save(path)
    again = EditResult.load(path)
    assert again.facts == loaded.facts and again.config == loaded.config
