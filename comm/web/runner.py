"""One model request at a time, its answer streamed token by token: what keeps the web demo's model calls apart."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from comm.pipeline import CommPipeline

T = TypeVar("T")
BUSY_MESSAGE = "the model is busy with another request: try again when it has finished"


class BusyError(RuntimeError):
    """A request came while the model was answering another one."""


class _StopWhenSet(StoppingCriteria):
    """Ends generation once ``event`` is set (the page that asked went away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class Streamed(Generic[T]):
    """A running request: iterate it for the text generated so far, then read ``result``."""

    def __init__(self, pieces: Iterator[str], outcome: dict[str, Any], done: threading.Event, stop: threading.Event):
        self._pieces = pieces
        self._outcome = outcome
        self._done = done
        self._stop = stop

    def __iter__(self) -> Iterator[str]:
        text = ""
        try:
            for piece in self._pieces:
                if piece:  # ending the streamer flushes an empty piece
                    text += piece
                    yield text
        finally:
            self._stop.set()  # a no-op once generation ended; stops it when the consumer left early

    @property
    def result(self) -> T:
        """The call's return value once its text is consumed; re-raises the call's error."""
        self._done.wait()
        if "error" in self._outcome:
            raise self._outcome["error"]
        return self._outcome["result"]


class ModelRunner:
    """Runs one pipeline call at a time in a worker thread with a token streamer; a second call while one runs
    raises `BusyError` at once instead of waiting or running beside it."""

    def __init__(self, pipe: CommPipeline):
        self.pipe = pipe
        self._lock = threading.Lock()

    @property
    def busy(self) -> bool:
        """Whether a call is running."""
        return self._lock.locked()

    def start(self, call: Callable[..., T]) -> Streamed[T]:
        """Start ``call(streamer=..., stopping_criteria=...)`` (a `CommPipeline` method bound to its inputs) in a
        worker thread; the returned `Streamed` yields the answer as it grows. The model stays taken until the call
        returns, even when the consumer stops early (generation is then told to stop)."""
        if not self._lock.acquire(blocking=False):
            raise BusyError(BUSY_MESSAGE)
        streamer = TextIteratorStreamer(self.pipe.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop, done, outcome = threading.Event(), threading.Event(), {}

        def work() -> None:
            try:
                outcome["result"] = call(
                    streamer=streamer, stopping_criteria=StoppingCriteriaList([_StopWhenSet(stop)])
                )
            except BaseException as error:  # handed to the consumer, which reports it
                outcome["error"] = error
            finally:
                self._lock.release()
                done.set()
                # A call that failed before generating (or never streamed) has not ended the streamer; ending it
                # twice only queues a second stop signal the consumer never reads.
                streamer.end()

        try:
            threading.Thread(target=work, name="comm-web-generate", daemon=True).start()
        except BaseException:
            self._lock.release()
            raise
        return Streamed(iter(streamer), outcome, done, stop)
