"""The corpus C is estimated from (``mom2_dataset``): a text file, a list of texts, a Hugging Face dataset
(``hf:<name>[:<config>]``) or documents the model writes itself (``model:<n>``,
:mod:`eamet.edit.model_corpus`)."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from eamet.base.errors import CorpusError, MissingDependencyError
from eamet.edit.model_corpus import model_corpus_size

__all__ = ["Corpus", "load_corpus"]


Corpus = str | os.PathLike[str] | Iterable[str]


def load_corpus(corpus: Corpus, n_samples: int) -> tuple[str, list[str]]:
    """The first ``n_samples`` documents of ``corpus`` and an id that changes whenever they do.

    ``corpus`` is ``"hf:<dataset>[:<config>]"`` (train split, shuffled with seed 1 as the reference does;
    needs the ``data`` extra), a path to a ``.jsonl`` file (field ``"text"``) or a text file (one document
    per non-empty line), or an iterable of strings. Raises ``CorpusError`` when nothing usable is found.
    (``"model:<n>"``, text sampled from the model, is handled by :class:`SecondMomentCollector`, which has
    the model: eamet.edit.model_corpus.)
    """
    if isinstance(corpus, str) and corpus.startswith("hf:"):
        return _load_hf(corpus, n_samples)
    if model_corpus_size(corpus) is not None:
        raise CorpusError(
            f"corpus {corpus!r} is sampled from a model: pass it to an Editor or SecondMomentCollector"
        )
    if isinstance(corpus, (str, os.PathLike)):
        path = Path(corpus)
        if not path.is_file():
            raise CorpusError(f"corpus file {str(path)!r} does not exist", path=str(path))
        texts = list(_read_file(path, n_samples))
        origin = f"file:{path.name}"
    else:
        texts = []
        for text in corpus:
            if not isinstance(text, str):
                raise CorpusError(f"corpus items must be strings, got {type(text).__name__}")
            if text.strip():
                texts.append(text)
            if len(texts) >= n_samples:
                break
        origin = "texts"
    if not texts:
        raise CorpusError(f"the corpus ({origin}) holds no non-empty text")
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")
    return f"{origin}:{len(texts)}:sha256:{digest.hexdigest()[:32]}", texts


def _read_file(path: Path, limit: int) -> Iterable[str]:
    count = 0
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if count >= limit:
                return
            if path.suffix == ".jsonl":
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise CorpusError(
                        f"{path}:{lineno}: expected a JSON object with a 'text' field", path=str(path)
                    ) from exc
            else:
                text = line.rstrip("\n")
            if isinstance(text, str) and text.strip():
                count += 1
                yield text


def _load_hf(corpus: str, n_samples: int) -> tuple[str, list[str]]:
    parts = corpus[3:].split(":")
    name, config = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None)
    how = (
        "offline, pass corpus= 'model:<n>' (text the model samples itself, e.g. model:200), a .txt/.jsonl "
        "path or an iterable of strings (CLI: --corpus)"
    )
    try:
        datasets: Any = importlib.import_module("datasets")  # optional: the `data` extra
    except ImportError:
        raise MissingDependencyError(f"corpus {corpus!r} needs `pip install eamet[data]`; or {how}") from None
    try:
        data = datasets.load_dataset(name, config, split="train")
    except Exception as exc:  # offline, gone loader scripts, auth: all end here
        raise CorpusError(
            f"could not load the dataset {corpus!r} ({type(exc).__name__}: {exc}); {how}"
        ) from exc
    data = data.shuffle(seed=1).select(range(min(n_samples, len(data))))
    texts = [t for t in data["text"] if isinstance(t, str) and t.strip()]
    if not texts:
        raise CorpusError(f"dataset {corpus!r} has no 'text' column with content; {how}")
    return f"{corpus}:train:shuffle1:{len(texts)}", texts
