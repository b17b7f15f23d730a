"""Read a trace ahead of its replay, in a thread: the parsers' compiled scans release the GIL, so on a second core
the next chunks are parsed while the replay works on this one (and while a real image is opened and checked).

At most ``budget_bytes`` of chunks wait (bounded memory whatever the file's size); an error in the reader reaches
the consumer as it was raised, at the point of the stream where it happened; a consumer that stops early stops the
reader.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Iterable, Iterator

BUDGET_BYTES = 256 << 20  # about 12M requests with times: a 10M-request file is read while the image opens

_END = object()


def prefetched(chunks: Iterable, budget_bytes: int = BUDGET_BYTES) -> Iterator:
    """The chunks of ``chunks`` (objects with ``nbytes``), produced by a reader thread up to ``budget_bytes``
    ahead of the consumer. The thread starts now, not at the first ``next``: the file is read while the caller
    still prepares (builds or opens the image)."""
    ready: queue.Queue = queue.Queue()
    room = threading.Condition()
    state = {"held": 0, "stop": False}

    def read() -> None:
        try:
            for chunk in chunks:
                with room:
                    while state["held"] > 0 and state["held"] + chunk.nbytes > budget_bytes and not state["stop"]:
                        room.wait()
                    if state["stop"]:
                        return
                    state["held"] += chunk.nbytes
                ready.put((chunk, None))
            ready.put((_END, None))
        except BaseException as exc:  # handed to the consumer, raised there
            ready.put((_END, exc))

    threading.Thread(target=read, name="qsim-trace-reader", daemon=True).start()
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
    finally:
        _stop(room, state)
