"""Layer 1, the floor: plain data and rules with no torch and no numpy — errors, the closed sets of
choices, the architecture table, settings and presets, facts and dataset records, metric names, progress
bars and atomic files. Imports nothing else of eamet.

The layers, bottom to top (each imports only its own folder and the folders below it; checked by
import-linter, ``pyproject.toml``): ``base`` → ``kernels`` → ``models`` → ``model`` → ``edit`` | ``measure``
→ ``sandbox`` → ``app``.
"""
