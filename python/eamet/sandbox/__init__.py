"""The sandbox: a world of facts to edit, generated from a seed or read from CounterFact records.

``World`` is plain data (no torch); the pocket model trained on a world comes with a later change.
"""

from __future__ import annotations

from eamet.sandbox.world import DEFAULT_RELATIONS, EditCase, Relation, World, WorldFact

__all__ = ["DEFAULT_RELATIONS", "EditCase", "Relation", "World", "WorldFact"]
