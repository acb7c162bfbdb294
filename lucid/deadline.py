"""Total deadlines for upstream calls, on one timer per second instead of one per call.

A route's total timeout covers an upstream call from its start to the response's last
byte. aiohttp can enforce it, but with a timer and a timer context of its own per
request, which measured about 1.4% of the proxy's instructions per request. Here every
call whose deadline falls in the same second shares one timer: a call's deadline is a
set insertion when it starts and a set removal when it ends.

Like aiohttp (``ceil_threshold``), a deadline is rounded up to the next whole second
only when the timeout is at least ``COARSE_FROM`` seconds; a shorter one keeps its
exact time (and a timer of its own).

A deadline interrupts only the awaits it is armed around (``with deadline:``), the
reads from the upstream, never a write to the client. Expiry works like
``asyncio.timeout``: the task is cancelled, and the cancellation comes out of the
``with`` block as ``TimeoutError``, unless the task was also cancelled for another
reason, which then wins. A deadline that passed while not armed raises
``TimeoutError`` as the next ``with`` begins.
"""

from __future__ import annotations

import asyncio
import math
from types import TracebackType

COARSE_FROM = 5.0


class Deadlines:
    """The deadlines of one event loop's calls, grouped by the time they expire."""

    def __init__(self, coarse_from: float = COARSE_FROM):
        self.coarse_from = coarse_from
        self._loop: asyncio.AbstractEventLoop | None = None
        self._due: dict[float, set[Deadline]] = {}

    def deadline(self, timeout: float) -> Deadline:
        """The current task's deadline, ``timeout`` seconds from now. ``close()`` it
        when the call is over."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        when = loop.time() + timeout
        if timeout >= self.coarse_from:
            when = math.ceil(when)
        due = self._due.get(when)
        if due is None:
            due = self._due[when] = set()
            loop.call_at(when, self._expire, when)
        # With the loop given, current_task() skips get_running_loop(), which on Python
        # 3.11 makes a getpid() system call.
        deadline = Deadline(due, when, asyncio.current_task(loop))
        due.add(deadline)
        return deadline

    def _expire(self, when: float) -> None:
        for deadline in self._due.pop(when, ()):
            deadline.expire()

    def __len__(self) -> int:
        """Deadlines not yet closed nor expired (for tests: none may be left behind)."""
        return sum(len(due) for due in self._due.values())


class Deadline:
    """One call's deadline; ``with deadline:`` arms it around an await, as often as
    needed (the request, then each read of the response body)."""

    __slots__ = ("_due", "when", "task", "expired", "_armed", "_cancelling")

    def __init__(self, due: set[Deadline], when: float, task: asyncio.Task[object] | None):
        assert task is not None, "a deadline needs a task to cancel"
        self._due = due
        self.when = when
        self.task = task
        self.expired = False
        self._armed = False
        self._cancelling = 0

    def __enter__(self) -> Deadline:
        if self.expired:
            raise TimeoutError
        self._armed = True
        self._cancelling = self.task.cancelling()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._armed = False
        if self.expired:  # as asyncio.timeout: our cancellation becomes TimeoutError
            if self.task.uncancel() <= self._cancelling and kind is asyncio.CancelledError:
                raise TimeoutError from error

    def expire(self) -> None:
        self.expired = True
        if self._armed:
            self.task.cancel()

    def close(self) -> None:
        """The call is over: forget the deadline."""
        self._due.discard(self)
