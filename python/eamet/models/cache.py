"""Converting a known model's GGUF file, once, into a float32 transformers checkpoint in eamet's cache.

An entry is ``<cache root>/models/<name>/``: ``config.json``, ``model.safetensors`` (float32, dequantised),
the tokenizer files (``tokenizer.json`` ...), and ``eamet-model.json``, the manifest written by
:func:`eamet.base.files.write_checked_dir`: the source GGUF's name, size and SHA-256, the conversion settings,
the library versions that converted it, and the SHA-256 of every file. An entry is used only when every
file matches its checksum, the conversion settings are the current ones and (when the wheel is
installed) the source GGUF is the one it was made from; otherwise it is rebuilt.
"""

from __future__ import annotations

import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from eamet.base.errors import CacheError, MissingDependencyError
from eamet.base.files import cache_dir, read_checked_dir, sha256_file, write_checked_dir
from eamet.kernels import __version__
from eamet.models.catalog import KnownModel

__all__ = ["MANIFEST", "check_entry", "convert", "entry_dir", "require_conversion_packages", "source_record"]

MANIFEST = "eamet-model.json"
_KIND = "eamet.models"
_REQUIRED_FILES = ("config.json", "tokenizer.json")
# What the conversion writes; a change here (or in the code that honours it) makes old entries stale.
CONVERSION = {"format": 1, "dtype": "float32", "dequantized": True}


def entry_dir(model: KnownModel, override: str | Path | None = None) -> Path:
    """The cache directory of ``model``: ``override`` (a models cache root) or ``cache_dir("models")``,
    then the model's name."""
    return cache_dir("models", override) / model.name


def source_record(gguf: Path) -> dict[str, Any]:
    """``{"file", "size", "sha256"}`` of a GGUF file: what a cache entry must have been made from."""
    return {"file": gguf.name, "size": gguf.stat().st_size, "sha256": sha256_file(gguf)}


def check_entry(entry: Path, model: KnownModel, source: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest of a usable cache entry of ``model``, converted from ``source`` (any source when
    ``None``: the wheel is not installed) with the current :data:`CONVERSION` settings.

    Raises ``CacheError`` naming the manifest or the first file that does not match.
    """

    def check(manifest: dict[str, Any]) -> None:
        problems = []
        if manifest.get("kind") != _KIND or manifest.get("model") != model.name:
            problems.append(f"written for {manifest.get('kind')}/{manifest.get('model')}, not {model.name}")
        if manifest.get("conversion") != CONVERSION:
            problems.append(f"conversion {manifest.get('conversion')} is not the current {CONVERSION}")
        if source is not None and manifest.get("source") != source:
            problems.append(f"converted from {manifest.get('source')}, not from the installed {source}")
        if not any(name.endswith(".safetensors") for name in manifest["files"]):
            problems.append("lists no .safetensors weights")
        if problems:
            raise CacheError(f"{entry}: {'; '.join(problems)}", path=str(entry / MANIFEST))

    return read_checked_dir(entry, MANIFEST, _REQUIRED_FILES, check)


def require_conversion_packages(model: KnownModel) -> None:
    """Raises ``MissingDependencyError`` with the install command unless torch, transformers, gguf and
    accelerate (what transformers needs to read a GGUF file) can be imported."""
    missing = []
    for package in ("torch", "transformers", "gguf", "accelerate"):
        try:
            __import__(package)
        except ImportError:
            missing.append(package)
    if missing:
        raise MissingDependencyError(
            f"converting {model.gguf_file} needs {', '.join(missing)}; install with: {model.install}",
            argument="name",
        )


def _versions() -> dict[str, str]:
    """The versions of what made a conversion, for the record (eamet's from its extension module)."""
    found = {"eamet": __version__}
    for package in ("transformers", "gguf", "torch"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "unknown"
    return found


def convert(model: KnownModel, gguf: Path, entry: Path, *, progress: bool = True) -> Path:
    """Reads ``gguf`` with transformers (dequantised to float32), writes the checkpoint and its tokenizer
    into ``entry`` atomically, with the manifest. Returns ``entry``.

    Takes 30-40 s for SmolLM2-135M on 2 CPU cores (docs/models.md).
    """
    require_conversion_packages(model)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = source_record(gguf)
    options: dict[str, Any] = {}
    try:  # transformers >= 5.x can keep GGUF weights packed; eamet edits dense matrices, so unpack them
        from transformers import GgufConfig

        options["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantise
        pass

    def fill(staging: Path) -> dict[str, Any]:
        start = time.perf_counter()
        if progress:
            print(
                f"eamet: converting {gguf.name} ({source['size'] / 2**20:.0f} MiB) into {entry} "
                "(done once; 30-40 s on 2 CPU cores) ...",
                file=sys.stderr,
            )
        lm: Any = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **options
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are plain float32 now; without this, save_pretrained refuses a "quantized" model and
        # a config that still names the GGUF quantizer would route the reload through it.
        if getattr(lm, "hf_quantizer", None) is not None:
            lm.hf_quantizer = None
        if getattr(lm.config, "quantization_config", None) is not None:
            del lm.config.quantization_config
        lm.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if progress:
            print(f"eamet: converted {model.name} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        return {
            "kind": _KIND,
            "model": model.name,
            "origin": model.origin,
            "licence": model.licence,
            "source": source,
            "conversion": CONVERSION,
            "versions": _versions(),
        }

    return write_checked_dir(entry, fill, MANIFEST)
