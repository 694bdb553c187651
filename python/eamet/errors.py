"""The public home of eamet's exceptions and warnings (``from eamet.errors import EametError``); they are
defined in :mod:`eamet.base.errors`, which every module inside the package imports instead."""

from eamet.base.errors import *  # noqa: F403
from eamet.base.errors import __all__ as __all__
