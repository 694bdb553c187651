"""Forward hooks as context managers that always remove themselves.

Three things an edit needs from a forward pass: read a module's *input* (keys), read a block's *output*
(hidden states h), and add a vector to a block's output at chosen positions (the residual δ). Extraction
passes stop right after the last module they need (:class:`StopForward`), which saves most of a deep
model's work.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from eamet.base.errors import UnsupportedArchitectureError

__all__ = [
    "StopForward",
    "add_to_output",
    "by_position",
    "cache_keyword",
    "hidden_of",
    "record_inputs",
    "record_outputs",
    "replace_forward",
    "run_until",
    "with_hidden",
]


class StopForward(Exception):  # noqa: N818 - control flow, not an error
    """Raised by a hook to end a forward pass early; :func:`run_until` catches it."""


def hidden_of(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a block's output (blocks return a tensor or a tuple led by one)."""
    return output if isinstance(output, torch.Tensor) else output[0]


def by_position(x: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    """``x`` as (batch, seq_len, features).

    Most blocks keep hidden states as (B, T, ·) throughout, but some (OPT) flatten them to (B·T, ·)
    before the MLP, so a recorded MLP input can arrive 2-D; every position is still there, in order.
    """
    if x.ndim == 3:
        return x
    if x.ndim == 2 and x.shape[0] == batch * seq_len:
        return x.reshape(batch, seq_len, x.shape[1])
    raise UnsupportedArchitectureError(
        f"a recorded activation of shape {tuple(x.shape)} is not one vector per token of a "
        f"({batch}, {seq_len}) batch; the ArchSpec's rewrite module must see each token separately"
    )


def with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """A block output of the same form as ``output`` (a tensor, or a tuple led by one) holding ``hidden``."""
    if isinstance(output, torch.Tensor):
        return hidden
    return (hidden, *output[1:])


@contextmanager
def record_inputs(modules: dict[Any, nn.Module], store: dict[Any, torch.Tensor]) -> Iterator[None]:
    """While active, ``store[name]`` holds the first positional input of ``modules[name]`` from the
    latest forward (detached).
    """
    with ExitStack() as stack:
        for name, module in modules.items():

            def hook(_m: nn.Module, args: tuple[Any, ...], name: Any = name) -> None:
                store[name] = args[0].detach()

            stack.callback(module.register_forward_pre_hook(hook).remove)
        yield


@contextmanager
def record_outputs(modules: dict[Any, nn.Module], store: dict[Any, torch.Tensor]) -> Iterator[None]:
    """While active, ``store[name]`` holds the hidden-state output of ``modules[name]`` (not detached)."""
    with ExitStack() as stack:
        for name, module in modules.items():

            def hook(_m: nn.Module, _a: tuple[Any, ...], output: Any, name: Any = name) -> None:
                store[name] = hidden_of(output)

            stack.callback(module.register_forward_hook(hook).remove)
        yield


@contextmanager
def add_to_output(block: nn.Module, edit: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """While active, the block's hidden-state output is replaced by ``edit(hidden)``."""

    def hook(_m: nn.Module, _a: tuple[Any, ...], output: Any) -> Any:
        return with_hidden(output, edit(hidden_of(output)))

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def cache_keyword(model: nn.Module) -> str | None:
    """The keyword of ``model.forward`` that takes a KV cache: ``"cache"`` (transformers ≥ 5.x, where
    ``past_key_values`` is deprecated), ``"past_key_values"``, or ``None`` for a forward that takes
    neither."""
    names = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in names), None)


def run_until(model: nn.Module, stop_after: nn.Module, **inputs: Any) -> None:
    """Runs ``model(**inputs)`` and stops as soon as ``stop_after`` has produced its output."""

    def stop(_m: nn.Module, _a: tuple[Any, ...], _o: Any) -> None:
        raise StopForward

    handle = stop_after.register_forward_hook(stop)
    try:
        model(**inputs)
    except StopForward:
        pass
    finally:
        handle.remove()


_NO_OWN_FORWARD = object()


@contextmanager
def replace_forward(module: nn.Module, forward: Callable[..., Any]) -> Iterator[None]:
    """While active, calling ``module`` runs ``forward`` instead of its own computation (forward hooks still
    run around it). Used to skip blocks whose outputs are already known. An instance-level ``forward``
    the module had before (accelerate sets one) is put back afterwards."""
    own = module.__dict__.get("forward", _NO_OWN_FORWARD)
    module.forward = forward
    try:
        yield
    finally:
        if own is _NO_OWN_FORWARD:
            del module.forward
        else:
            module.forward = own
