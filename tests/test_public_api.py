"""The public API — every name in ``eamet.__all__``, ``eamet.models``, ``eamet.sandbox`` and ``eamet.errors``,
each class's public methods and dataclass fields, each function's signature, and every command and option
of the ``eamet`` command line — against its record in tests/data/public_api.json.

A refactoring must leave the record as it is. A deliberate change of the API rewrites it with
``python tests/test_public_api.py --write`` and says so in the change.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sys
from pathlib import Path
from typing import Any

import pytest

RECORD = Path(__file__).resolve().parent / "data" / "public_api.json"


def _describe(obj: Any) -> Any:
    if inspect.ismodule(obj):
        return "module"
    if inspect.isclass(obj):
        described: dict[str, Any] = {"bases": [b.__name__ for b in obj.__mro__[1:] if b is not object]}
        if dataclasses.is_dataclass(obj):
            described["fields"] = [f.name for f in dataclasses.fields(obj)]
        members: dict[str, str] = {}
        for name, member in sorted(vars(obj).items()):
            if name.startswith("_") and name != "__init__":
                continue
            function = member.__func__ if isinstance(member, classmethod | staticmethod) else member
            if isinstance(member, property):
                members[name] = "property"
            elif callable(function):
                members[name] = _signature(function)
        described["members"] = members
        return described
    if callable(obj):
        return _signature(obj)
    return type(obj).__name__


def _signature(function: Any) -> str:
    try:
        return str(inspect.signature(function))
    except (TypeError, ValueError):  # some builtins have none
        return "callable"


def _namespace(module: Any) -> dict[str, Any]:
    return {name: _describe(getattr(module, name)) for name in sorted(module.__all__)}


def _command_line() -> dict[str, list[str]]:
    from eamet.app.parser import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    options = {"": sorted(o for a in parser._actions for o in a.option_strings)}
    for name, sub in sorted(commands.choices.items()):
        flags = sorted(o for a in sub._actions for o in a.option_strings)
        positional = sorted(a.dest for a in sub._actions if not a.option_strings and a.dest != "help")
        options[name] = flags + positional
    return options


def public_api() -> dict[str, Any]:
    """The API as it is now, in the record's form."""
    pytest.importorskip("torch")  # the editing names resolve lazily, and need torch to be described
    import eamet
    import eamet.errors
    import eamet.models
    import eamet.sandbox

    return {
        "eamet": _namespace(eamet),
        "eamet.errors": _namespace(eamet.errors),
        "eamet.models": _namespace(eamet.models),
        "eamet.sandbox": _namespace(eamet.sandbox),
        "cli": _command_line(),
    }


def test_public_api_is_the_recorded_one() -> None:
    recorded = json.loads(RECORD.read_text(encoding="utf-8"))
    now = json.loads(json.dumps(public_api()))  # tuples → lists, as in the record
    for space in sorted(set(recorded) | set(now)):
        assert now.get(space) == recorded.get(space), f"the public API of {space} changed"


def test_errors_module_is_the_one_the_package_raises() -> None:
    import eamet.errors
    from eamet.base import errors as defined

    assert eamet.errors.__all__ == defined.__all__
    for name in eamet.errors.__all__:
        assert getattr(eamet.errors, name) is getattr(defined, name)
    assert eamet.errors.EametError is eamet.EametError


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    RECORD.write_text(json.dumps(public_api(), indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {RECORD}")
