"""Layer 2: numpy ↔ the Rust core. The only importer of ``eamet._core``: pairwise cosine and top-M
neighbours, the misalignment diagnostic, streaming second moments (C), the thread pool and the version."""

from eamet._core import __version__, get_num_threads, set_num_threads

__all__ = ["__version__", "get_num_threads", "set_num_threads"]
