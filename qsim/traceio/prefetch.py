"""Make chunks ahead of their consumer, in a thread: a trace read ahead of its replay (the parsers' compiled scans
release the GIL, so on a second core the next chunks are parsed while the replay works on this one, and while a
real image is opened and checked), or stage 1's event chunks made while stage 2 counts the previous ones (both
kernels release the GIL).

At most ``budget_bytes`` of chunks wait (bounded memory whatever the file's size), and at most ``in_flight``
chunks are out at once for a source that reuses its buffers; an error in the producer reaches the consumer as it
was raised, at the point of the stream where it happened; a consumer that stops early stops the producer.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Iterable, Iterator

BUDGET_BYTES = 256 << 20  # about 12M requests with times: a 10M-request file is read while the image opens

_END = object()


def prefetched(chunks: Iterable, budget_bytes: int = BUDGET_BYTES, in_flight: int | None = None) -> Iterator:
    """The chunks of ``chunks`` (objects with ``nbytes``), produced by a thread up to ``budget_bytes`` ahead of the
    consumer. ``in_flight``: at most this many chunks made and not yet done with, a chunk being done with when the
    consumer asks for the next one (for a source whose chunks share buffers: one that reuses a set of buffers
    every k chunks is safe with k). The thread starts now, not at the first ``next``: the file is read while the
    caller still prepares (builds or opens the image)."""
    ready: queue.Queue = queue.Queue()
    room = threading.Condition()
    state = {"held": 0, "out": 0, "stop": False}
    limit = in_flight if in_flight is not None else float("inf")

    def produce() -> None:
        try:
            source = iter(chunks)
            while True:
                with room:
                    while state["out"] >= limit and not state["stop"]:  # (before the source makes the next one)
                        room.wait()
                    if state["stop"]:
                        return
                chunk = next(source, _END)
                if chunk is _END:
                    break
                with room:
                    while state["held"] > 0 and state["held"] + chunk.nbytes > budget_bytes and not state["stop"]:
                        room.wait()
                    if state["stop"]:
                        return
                    state["held"] += chunk.nbytes
                    state["out"] += 1
                ready.put((chunk, None))
            ready.put((_END, None))
        except BaseException as exc:  # handed to the consumer, raised there
            ready.put((_END, exc))

    threading.Thread(target=produce, name="qsim-trace-reader", daemon=True).start()
    stream = _handed_over(ready, room, state)
    weakref.finalize(stream, _stop, room, state)  # (a stream dropped before its first chunk stops the reader too)
    return stream


def _stop(room: threading.Condition, state: dict) -> None:
    with room:
        state["stop"] = True
        room.notify()


def _handed_over(ready: queue.Queue, room: threading.Condition, state: dict) -> Iterator:
    try:
        while True:
            chunk, error = ready.get()
            if chunk is _END:
                if error is not None:
                    raise error
                return
            with room:
                state["held"] -= chunk.nbytes
                room.notify()
            yield chunk
            with room:  # the consumer asks for the next one: done with this one
                state["out"] -= 1
                room.notify()
    finally:
        _stop(room, state)
