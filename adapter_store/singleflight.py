"""Single flight: concurrent calls for one key share one execution (and its result or error)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Generic, TypeVar

T = TypeVar("T")


class SingleFlight(Generic[T]):
    def __init__(self):
        self._lock = threading.Lock()
        self._calls: dict[Hashable, Future] = {}

    def do(self, key: Hashable, fn: Callable[[], T]) -> T:
        """fn() if no call for `key` is running, else wait for the running one and return what it returns."""
        with self._lock:
            future = self._calls.get(key)
            leader = future is None
            if leader:
                future = self._calls[key] = Future()
        if not leader:
            return future.result()
        try:
            result = fn()
        except BaseException as e:
            future.set_exception(e)
            raise
        else:
            future.set_result(result)
            return result
        finally:
            with self._lock:
                del self._calls[key]

    def running(self) -> list[Hashable]:
        with self._lock:
            return list(self._calls)
