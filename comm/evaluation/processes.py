"""The evaluation processes (accelerate): one or many (``torchrun``, the DeepSpeed launcher) run the same code, and
work only the main process may do runs there with its result or its error shared with the others."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from comm.errors import UserError

R = TypeVar("R")

# Errors the main process hands to the others keep their type when it is one of these (others become RuntimeError).
_SHARED_ERRORS: dict[str, type[Exception]] = {
    error.__name__: error for error in (ValueError, FileNotFoundError, OSError, RuntimeError, ImportError, UserError)
}


def process_state() -> PartialState:
    """This process among the evaluation processes; joins the launcher's process group on first use.

    Without a launcher it is process 0 of 1. Without CUDA the processes talk over gloo on the CPU.
    """
    return PartialState(cpu=not torch.cuda.is_available())


def on_main(fn: Callable[..., R], *args: Any, share: bool = True) -> R | None:
    """``fn(*args)`` on the main process only; its error is raised on every process (so none waits forever).

    With ``share`` the result is sent to every process; otherwise the others get None.
    """
    state = process_state()
    result: Any = None
    error: BaseException | None = None
    if state.is_main_process:
        try:
            result = fn(*args)
        except Exception as exc:  # re-raised below, on every process
            error = exc
    if state.num_processes > 1:
        failure = None if error is None else (type(error).__name__, str(error))
        shared = [(result if share else None, failure)]
        broadcast_object_list(shared, from_process=0)
        shared_result, failure = shared[0]
        if not state.is_main_process:
            if failure is not None:
                name, message = failure
                raise _SHARED_ERRORS.get(name, RuntimeError)(f"rank 0 failed: {name}: {message}")
            return shared_result if share else None
    if error is not None:
        raise error
    return result
