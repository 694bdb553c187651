# Hand-written stubs of the Rust extension module; checked in CI with `python -m mypy.stubtest eamet._core`.
from collections.abc import Callable
from os import PathLike
from typing import Any, TypeAlias, final

import numpy as np
import numpy.typing as npt

__all__ = [
    "SecondMoment",
    "__version__",
    "get_num_threads",
    "misalignment",
    "neighbors",
    "set_num_threads",
]

__version__: str

_ProgressCallback: TypeAlias = Callable[[int, int], object]

def misalignment(
    keys: npt.NDArray[np.floating[Any]],
    residuals: npt.NDArray[np.floating[Any]],
    *,
    tau: float,
    top_m: int,
    progressive: bool,
    block: int = 0,
    progress: _ProgressCallback | None = None,
) -> dict[str, Any]: ...
def neighbors(
    x: npt.NDArray[np.floating[Any]],
    top_m: int,
    *,
    progressive: bool = False,
    block: int = 0,
    progress: _ProgressCallback | None = None,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]: ...
def get_num_threads() -> int: ...
def set_num_threads(n: int) -> None: ...

@final
class SecondMoment:
    def __new__(cls, dim: int) -> SecondMoment: ...
    @staticmethod
    def from_sum(
        total: npt.NDArray[np.floating[Any]], count: int, input_dtype: str = "float32"
    ) -> SecondMoment: ...
    @property
    def dim(self) -> int: ...
    @property
    def count(self) -> int: ...
    @property
    def input_dtype(self) -> str: ...
    def update(self, batch: npt.NDArray[np.floating[Any]]) -> None: ...
    def merge(self, other: SecondMoment) -> None: ...
    def moment(self) -> npt.NDArray[np.float64]: ...
    def save(self, path: str | PathLike[str], metadata: str | None = None) -> None: ...
    @staticmethod
    def load(path: str | PathLike[str]) -> tuple[SecondMoment, str | None]: ...
