"""Layer 5: the editing algorithm (EAMET, MEMIT) — prompts and keys, the corpus and its second moment
C, the residual objective and its optimiser, the solve, the residual store, capacity, the editor and the
edit it returns."""
