"""The ``eamet`` command line.

Every command has ``--help``; failures print one line, ``eamet: error: ...``, to stderr and exit 1
(2 for usage errors, as argparse does; ``eamet edit --strict`` exits 3 when a fact did not land).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from eamet.app.parser import build_parser
from eamet.base.errors import EametError

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``eamet`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        print("eamet: interrupted", file=sys.stderr)
        return 130
    except (EametError, OSError, ValueError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"eamet: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
