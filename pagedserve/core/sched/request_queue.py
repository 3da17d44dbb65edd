"""Waiting queues of the scheduler: FCFS and priority.

Removal is lazy: `discard` only counts a finished request as gone, and the queue drops it when
it reaches the front, so aborting a waiting request costs O(1) however long the queue is.
"""

from __future__ import annotations

import heapq
import itertools
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator

from pagedserve.core.request import Request


class RequestQueue(ABC):
    """Invariant: every live (unfinished) request appears once; finished ones may linger
    until they reach the front and are counted in `_num_discarded` until then."""

    def __init__(self) -> None:
        self._num_discarded = 0

    @abstractmethod
    def add_request(self, request: Request) -> None:
        """Enqueue a new request according to the policy."""

    @abstractmethod
    def prepend_request(self, request: Request) -> None:
        """Put a preempted request back (FCFS: at the front; priority: by its key)."""

    @abstractmethod
    def _raw_peek(self) -> Request | None: ...

    @abstractmethod
    def _raw_pop(self) -> Request: ...

    @abstractmethod
    def _raw_len(self) -> int: ...

    @abstractmethod
    def _raw_iter(self) -> Iterator[Request]: ...

    def discard(self, request: Request) -> None:
        """Forget a queued request that has just been finished (status already set)."""
        assert request.is_finished()
        self._num_discarded += 1

    def _drop_finished_front(self) -> Request | None:
        request = self._raw_peek()
        while request is not None and request.is_finished():
            self._raw_pop()
            self._num_discarded -= 1
            request = self._raw_peek()
        return request

    def peek_request(self) -> Request:
        request = self._drop_finished_front()
        if request is None:
            raise IndexError("peek from an empty request queue")
        return request

    def pop_request(self) -> Request:
        if self._drop_finished_front() is None:
            raise IndexError("pop from an empty request queue")
        return self._raw_pop()

    def __len__(self) -> int:
        return self._raw_len() - self._num_discarded

    def __bool__(self) -> bool:
        return len(self) > 0

    def __iter__(self) -> Iterator[Request]:
        """Live requests in no guaranteed order; O(n), for stats and tests."""
        return (r for r in self._raw_iter() if not r.is_finished())


class FCFSRequestQueue(RequestQueue):
    def __init__(self) -> None:
        super().__init__()
        self._queue: deque[Request] = deque()

    def add_request(self, request: Request) -> None:
        self._queue.append(request)

    def prepend_request(self, request: Request) -> None:
        self._queue.appendleft(request)

    def _raw_peek(self) -> Request | None:
        return self._queue[0] if self._queue else None

    def _raw_pop(self) -> Request:
        return self._queue.popleft()

    def _raw_len(self) -> int:
        return len(self._queue)

    def _raw_iter(self) -> Iterator[Request]:
        return iter(self._queue)


class PriorityRequestQueue(RequestQueue):
    """Lower `priority` first, then earlier `arrival_time`, then insertion order."""

    def __init__(self) -> None:
        super().__init__()
        self._heap: list[tuple[int, float, int, Request]] = []
        self._counter = itertools.count()

    def add_request(self, request: Request) -> None:
        heapq.heappush(self._heap, (request.priority, request.arrival_time, next(self._counter), request))

    def prepend_request(self, request: Request) -> None:
        # Its original (priority, arrival_time) key already puts it where it belongs.
        self.add_request(request)

    def _raw_peek(self) -> Request | None:
        return self._heap[0][3] if self._heap else None

    def _raw_pop(self) -> Request:
        return heapq.heappop(self._heap)[3]

    def _raw_len(self) -> int:
        return len(self._heap)

    def _raw_iter(self) -> Iterator[Request]:
        return (entry[3] for entry in self._heap)


def create_request_queue(policy: str) -> RequestQueue:
    if policy == "fcfs":
        return FCFSRequestQueue()
    if policy == "priority":
        return PriorityRequestQueue()
    raise ValueError(f"unknown scheduling policy {policy!r}")
