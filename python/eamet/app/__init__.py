"""Layer 7, the top: the ``eamet`` command line (parser and commands), the before/after protocol of the
demo and benchmarks, report formatting, and model loading by name for the CLI."""
