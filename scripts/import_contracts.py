"""An import-linter contract for what its built-in types cannot see (used by ``lint-imports``; see
pyproject.toml): the Rust extension ``eamet._core`` is a compiled module, absent from the import graph, whose
imports the graph records as imports of the root package ``eamet``.

``one_door``: inside the package, only the ``door`` layer imports the extension, and nothing imports the root
package ``eamet/__init__.py`` (the public facade, which imports the layers, never the other way round).
"""

from __future__ import annotations

import re
from typing import Any

from importlinter.application import output
from importlinter.domain import fields
from importlinter.domain.contract import Contract, ContractCheck


class OneDoorContract(Contract):
    """Fields: ``root`` (the package), ``door`` (the only layer that may import the extension),
    ``extension`` (its module name under ``root``, e.g. ``_core``)."""

    type_name = "one_door"

    root = fields.StringField()
    door = fields.StringField()
    extension = fields.StringField()

    def check(self, graph: Any, verbose: bool) -> ContractCheck:
        root, door, extension = str(self.root), str(self.door), str(self.extension)
        of_extension = re.compile(
            rf"^\s*(from\s+{root}\s+import\s+{extension}\b|from\s+{root}\.{extension}\s+import\b"
            rf"|import\s+{root}\.{extension}\b)"
        )
        broken = []
        for importer in sorted(graph.find_modules_that_directly_import(root)):
            in_door = importer == door or importer.startswith(door + ".")
            for detail in graph.get_import_details(importer=importer, imported=root):
                line = str(detail["line_contents"])
                if of_extension.match(line):
                    if not in_door:
                        broken.append(
                            (importer, detail["line_number"], line, f"only {door} imports {extension}")
                        )
                else:
                    broken.append((importer, detail["line_number"], line, f"nothing inside imports {root}"))
        return ContractCheck(kept=not broken, warnings=[], metadata={"broken": broken})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for importer, line_number, line, rule in check.metadata["broken"]:
            output.print_error(f"{importer}:{line_number}: {line} ({rule})")
            output.new_line()
