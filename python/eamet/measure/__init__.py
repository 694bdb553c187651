"""Layer 5 (beside ``edit``, independent of it): measuring a model — the evaluation protocol, greedy
generation and fluency, known facts, causal tracing."""
